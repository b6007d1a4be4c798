"""Counter-based random numbers: every draw of the simulator is a pure function of its keys.

A click at slot j of user u's t-th request under seed s uses ``uniform(s, CLICK, u, t, j)``, whatever
policy is being simulated and whatever happened before. That gives

- reproducibility: same seed, same outcomes, on any batch size or split into batches;
- common random numbers: two policies that show the same user the same item at the same slot get
  the same draw, so a paired comparison sees only the effect of the policy;
- the same integers on CPU and CUDA (the hash is integer arithmetic).

The hash is Chris Wellons' ``lowbias32`` 32-bit mixer, chained over the keys. Values live in int64
tensors below 2**32 and every product is split so that it stays below 2**63: no overflow, no
reliance on wrap-around.
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF

# Streams: one per kind of draw, so that draws of different kinds never coincide.
CLICK, DWELL, LEAVE, RETURN, LIST, USER, POLICY, ITEM = range(1, 9)


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) without leaving int64's range."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + ((x * hi) & 0xFFFF) * 65536) & MASK32


def mix32(x: Tensor) -> Tensor:
    """A bijection of [0, 2**32) with good avalanche (lowbias32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_keys(seed: int, *keys: Tensor | int, device: torch.device | str | None = None) -> Tensor:
    """Chain ``mix32`` over ``seed`` and the keys (integers or int64 tensors, broadcast together)."""
    tensors = [k for k in keys if isinstance(k, Tensor)]
    if device is None:
        device = tensors[0].device if tensors else torch.device("cpu")
    h = mix32(torch.tensor(seed & MASK32, dtype=torch.int64, device=device))
    for key in keys:
        key = key.to(torch.int64) if isinstance(key, Tensor) else torch.tensor(key, dtype=torch.int64, device=device)
        h = mix32(h ^ (key & MASK32))
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
