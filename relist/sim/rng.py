"""Counter-based random numbers: every draw of the simulator is a pure function of its keys.

A click at slot j of user u's t-th request under seed s uses ``uniform(s, CLICK, u, t, j)``, whatever
policy is being simulated and whatever happened before. That gives

- reproducibility: same seed, same outcomes, on any batch size or split into batches;
- common random numbers: two policies that show the same user the same item at the same slot get
  the same draw, so a paired comparison sees only the effect of the policy;
- the same integers on CPU and CUDA (the hash is integer arithmetic).

The hash is a 32-bit xorshift-multiply mixer in the style of Chris Wellons' ``lowbias32``, chained
over the keys. Values live in int64 tensors below 2**32 and both multipliers are below 2**31, so every
product stays below 2**63: no overflow, no reliance on wrap-around. Scalar keys (the seed, the stream)
are mixed in Python integers; only tensor keys cost tensor operations.
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF

# Streams: one per kind of draw, so that draws of different kinds never coincide.
CLICK, DWELL, LEAVE, RETURN, LIST, USER, POLICY, ITEM = range(1, 9)


_M1, _M2 = 0x7FEB352D, 0x5BD1E995  # odd multipliers below 2**31


def _mix_int(x: int) -> int:
    x &= MASK32
    x ^= x >> 16
    x = (x * _M1) & MASK32
    x ^= x >> 15
    x = (x * _M2) & MASK32
    return x ^ (x >> 16)


def mix32(x: Tensor) -> Tensor:
    """A bijection of [0, 2**32) (int64 tensor values) with good avalanche; ``_mix_int`` on tensors."""
    x = x ^ (x >> 16)
    x = (x * _M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & MASK32
    return x ^ (x >> 16)


def hash_keys(seed: int, *keys: Tensor | int, device: torch.device | str | None = None) -> Tensor:
    """Chain the mixer over ``seed`` and the keys (integers or int64 tensors, broadcast together)."""
    h: int | Tensor = _mix_int(seed)
    for key in keys:
        if isinstance(key, Tensor):
            h = mix32((key.to(torch.int64) & MASK32) ^ h)
        elif isinstance(h, Tensor):
            h = mix32(h ^ (key & MASK32))
        else:
            h = _mix_int(h ^ key)
    if not isinstance(h, Tensor):
        h = torch.tensor(h, dtype=torch.int64, device=device or "cpu")
    return h


def to_uniform(h: Tensor) -> Tensor:
    """Hash values -> float32 uniforms in (0, 1), 24 bits each (never exactly 0 or 1)."""
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def uniform(seed: int, *keys: Tensor | int, device: torch.device | str | None = None) -> Tensor:
    return to_uniform(hash_keys(seed, *keys, device=device))


def normal(seed: int, *keys: Tensor | int, device: torch.device | str | None = None) -> Tensor:
    """Standard normal draws by the inverse CDF of ``uniform``."""
    return torch.special.ndtri(uniform(seed, *keys, device=device))


def index(seed: int, n: int, *keys: Tensor | int, device: torch.device | str | None = None) -> Tensor:
    """Uniform integers in [0, n) (n well below 2**24 keeps the bias negligible)."""
    return (uniform(seed, *keys, device=device) * n).long().clamp_max(n - 1)
