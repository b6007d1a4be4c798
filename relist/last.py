"""LAST — learning at serving time (arXiv 2406.14004): a request-specific offset, used once and discarded.

For each request the generator's list is improved with the evaluator as surrogate feedback:

- the gradient g of the generation objective J = Σ_t A_t log π(a_t) of a list, with A_t the discounted
  (γ) per-position advantage of the evaluator's click probabilities over the initial order's, is taken
  with respect to an offset Δ and normalised per tensor and request: unit = g/‖g‖ · ‖base‖ · ``scale``
  (the official code: s · g/‖g‖ · ‖state‖ · 0.01);
- parallel: one gradient at Δ = 0 on the greedy list, then K candidates decoded by sampling with
  Δ_k = s_k · unit (default s = [0, 0, 0, 0, 6, 7, 8, 9]: four pure samples and four guided ones), plus
  the unmodified greedy list; all candidates of all requests in one batched pass; the evaluator picks;
- serial: sample with the current Δ → evaluate → Δ += ``serial_step`` · unit at the sampled list →
  repeat, up to ``serial_steps`` steps or ``serial_seconds``; the best list seen (greedy included) wins.

Offsets live on the generator's activations (``offsets="activations"``: the encoder states and the
decoder's initial state, as the official code does) or on a subset of its weights (the paper's wording:
``pointer`` = the pointer's scoring layers, ``decoder`` = everything after the item encoder, ``all`` =
every weight of the decoding network; the feature embeddings are never offset). Weight offsets are
per request and candidate through ``torch.func.functional_call`` under ``vmap``; the module's own
parameters are only read, so the deployed weights stay bit-identical whatever happens in a request.

The gradient needs log π of a list whose order is already known, so it is computed by teacher forcing in
one pass over the steps (``PointerNet.teacher_forced``: the GRU over the known inputs, the attention and
the pointer of every step batched under an "already chosen" mask), not by replaying the decoding loop;
the two agree to float rounding (tests check the gradients and the served lists). The whole call runs
under ``torch.inference_mode`` except the gradient step.

Selection is by the evaluator. ``select="oracle"`` picks by NDCG@L on the request's labels instead (what
the official evaluation script does); it needs labels and is for analysis only, labelled as such.
Deviations: the gradient is taken on the greedy list (the official code samples a list for it);
``grad_steps = T`` (off by default) limits the gradient to the first T decoding steps, which changes the
objective and now saves little time.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from relist.batch import ListBatch
from relist.config import option
from relist.rerankers.generator import (
    Generator,
    PointerNet,
    discounted_returns,
    gumbel,
    ndcg_gains,
    order_scores,
)

OFFSETS = ("activations", "pointer", "decoder", "all")
MODES = ("parallel", "serial", "greedy")  # greedy: the unmodified generator
SELECTIONS = ("evaluator", "oracle")
OFFICIAL_STEPS = (0.0, 0.0, 0.0, 0.0, 6.0, 7.0, 8.0, 9.0)


@dataclass(frozen=True)
class LastConfig:
    mode: str = option("parallel", help="LAST mode; greedy serves the generator's own list", choices=MODES)
    offsets: str = option("activations", help="where LAST's offsets go", choices=OFFSETS)
    steps: tuple[float, ...] = option(OFFICIAL_STEPS, help="parallel: one sampled candidate per step size")
    scale: float = option(0.01, help="unit offset = g/||g|| * ||base|| * scale")
    gamma: float = option(0.3, help="discount of later positions' advantages")
    serial_steps: int = option(8, help="serial: generate-evaluate-update rounds")
    serial_seconds: float = option(0.0, help="serial: wall-clock budget per call (0: none)")
    serial_step: float = option(6.0, help="serial: step size of each offset update")
    select: str = option("evaluator", help="what picks the served candidate (oracle: test labels)", choices=SELECTIONS)
    grad_steps: int = option(
        0, help="decoding steps LAST's gradient flows through (0: all, the paper's objective; T > 0 is a deviation)"
    )
    batched: bool = option(True, help="parallel: all candidates in one pass (False loops over them: a reference)")

    def __post_init__(self):
        for name, value, valid in (
            ("mode", self.mode, MODES),
            ("offsets", self.offsets, OFFSETS),
            ("select", self.select, SELECTIONS),
        ):
            if value not in valid:
                raise ValueError(f"LAST: unknown {name} {value!r}; valid: {', '.join(valid)}")
        if self.serial_steps < 0 or self.serial_seconds < 0 or self.scale < 0 or self.grad_steps < 0:
            raise ValueError("LAST: serial_steps, serial_seconds, scale and grad_steps must be non-negative")

    @property
    def label(self) -> str:
        base = f"LAST {self.mode} ({self.offsets})"
        return base + " [oracle selection: test labels]" if self.select == "oracle" else base


class Reranked(NamedTuple):
    order: Tensor  # (B, L) input positions in serving order, padding last
    scores: Tensor  # (B, L) per-item scores that rank into ``order`` (−inf on padding)
    value: Tensor  # (B,) evaluator score (mean click probability) of the served list
    winner: Tensor  # (B,) which candidate won: 0 = the unmodified greedy list, k = the k-th exploration
    candidates: Tensor  # (B, C) evaluator score of every candidate


class _Activations:
    """Offsets on the encoder states (N, L, H) and the decoder's initial state (N, H) of each request."""

    def __init__(self, net: PointerNet, x: Tensor, mask: Tensor, scale: float):
        self.net, self.mask, self.scale = net, mask, scale
        self.states, self.init = net.states(x, mask)

    def zero(self, rows: Tensor) -> dict[str, Tensor]:
        return {"states": torch.zeros_like(self.states[rows]), "init": torch.zeros_like(self.init[rows])}

    def _base(self, delta: dict[str, Tensor], rows: Tensor) -> tuple[Tensor, Tensor]:
        return self.states[rows] + delta["states"] * self.mask[rows, :, None], self.init[rows] + delta["init"]

    def decode(self, delta: dict[str, Tensor], rows: Tensor, noise: Tensor | None) -> Tensor:
        states, init = self._base(delta, rows)
        return self.net.decode(states, init, self.mask[rows], noise)[0]

    def unit(self, delta: dict[str, Tensor], rows: Tensor, order: Tensor, advantage: Tensor) -> dict[str, Tensor]:
        with _autograd():
            states, init = (t.clone().requires_grad_() for t in self._base(delta, rows))
            mask, order, advantage = _ordinary(self.mask[rows], order, advantage)
            log_p = self.net.teacher_forced(states, init, mask, order)
            g_states, g_init = torch.autograd.grad((advantage * log_p).sum(), (states, init))
        return {
            "states": _normalise(g_states, self.states[rows], self.scale),
            "init": _normalise(g_init, self.init[rows], self.scale),
        }


class _Weights:
    """Offsets on a subset of the decoding network's weights, one copy per row, through torch.func."""

    def __init__(self, net: PointerNet, x: Tensor, mask: Tensor, scale: float, subset: str):
        self.net, self.x, self.mask, self.scale = net, x, mask, scale
        params = {n: p.detach() for n, p in net.named_parameters()}
        self.names = [n for n in params if _in_subset(n, subset)]
        self.fixed = {n: p for n, p in params.items() if n not in self.names}
        self.base = {n: params[n] for n in self.names}
        self.scorer = _TeacherForced(net)

    def zero(self, rows: Tensor) -> dict[str, Tensor]:
        return {n: torch.zeros((len(rows), *p.shape), dtype=p.dtype, device=p.device) for n, p in self.base.items()}

    def _decode_one(self, delta, x, mask, noise):
        params = {**self.fixed, **{n: self.base[n] + delta[n] for n in self.names}}
        return functional_call(self.net, params, (x[None], mask[None]), {"noise": noise[None]})[0][0]

    def _log_p_one(self, delta, x, mask, order, advantage):
        params = {**self.fixed, **{n: self.base[n] + delta[n] for n in self.names}}
        log_p = functional_call(
            self.scorer, {f"net.{n}": p for n, p in params.items()}, (x[None], mask[None], order[None])
        )
        return (advantage * log_p[0]).sum()

    def decode(self, delta: dict[str, Tensor], rows: Tensor, noise: Tensor | None) -> Tensor:
        if noise is None:  # greedy: no noise
            noise = torch.zeros(len(rows), self.x.shape[1], self.x.shape[1], device=self.x.device)
        return vmap(self._decode_one)(delta, self.x[rows], self.mask[rows], noise)

    def unit(self, delta: dict[str, Tensor], rows: Tensor, order: Tensor, advantage: Tensor) -> dict[str, Tensor]:
        with _autograd():
            delta = dict(zip(delta, _ordinary(*delta.values())))
            grads = vmap(grad(self._log_p_one))(delta, *_ordinary(self.x[rows], self.mask[rows], order, advantage))
        return {n: _normalise(grads[n], self.base[n].expand_as(grads[n]), self.scale) for n in self.names}


class _TeacherForced(nn.Module):
    """``net``'s per-step log-probabilities of a known order in one pass (``PointerNet.teacher_forced``), as a
    module ``functional_call`` can run with per-request weights; the GRU runs as a loop of cells under ``vmap``."""

    def __init__(self, net: PointerNet):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, mask: Tensor, order: Tensor) -> Tensor:
        states, h = self.net.states(x, mask)
        return self.net.teacher_forced(states, h, mask, order, fused_gru=False)


@contextmanager
def _autograd():
    """Gradients on: ``Last.__call__`` runs under ``torch.inference_mode``, which the gradient step leaves."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _ordinary(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Copies that autograd may save (tensors made under inference mode may not be)."""
    return tuple(t.clone() for t in tensors)


def _in_subset(name: str, subset: str) -> bool:
    if subset == "all":
        return True
    if subset == "decoder":
        return not name.startswith("encoder.")
    return name.startswith("pointer_")  # "pointer": the scoring layers of the pointer


def _normalise(g: Tensor, base: Tensor, scale: float) -> Tensor:
    """g/‖g‖ · ‖base‖ · scale per row (leading dimension); a zero gradient gives a zero offset."""
    dims = tuple(range(1, g.dim()))
    g_norm = g.norm(dim=dims, keepdim=True) if dims else g.abs()
    b_norm = base.norm(dim=dims, keepdim=True) if dims else base.abs()
    return g / g_norm.clamp_min(1e-12) * b_norm * scale


class Last:
    """LAST around a trained generator and evaluator; ``__call__(batch)`` returns ``Reranked``.

    Reads the modules' weights, never writes them, and keeps no state between calls. Sets both modules to
    eval mode (the evaluator's dropout must be off at serving).
    """

    def __init__(self, generator: Generator, evaluator, config: LastConfig | None = None):
        self.generator, self.evaluator = generator.eval(), evaluator.eval()
        self.config = config or LastConfig()
        self._threads = threading.local()

    def _own_net(self) -> PointerNet:
        """This thread's copy of the decoding network's modules, sharing the very parameter tensors: weight
        offsets go in through ``functional_call``, which swaps a module's parameters while it runs, so each
        thread swaps them on its own copy and ``Last`` can be called from several threads at once."""
        net = self.generator.net
        mine = getattr(self._threads, "net", None)
        if mine is None or self._threads.source is not net:
            shared = {id(t): t for t in (*net.parameters(), *net.buffers())}
            self._threads.net, self._threads.source = copy.deepcopy(net, memo=shared), net
        return self._threads.net

    def _gains(self, batch: ListBatch, rows: Tensor, orders: Tensor) -> Tensor:
        """Per-position click probability (N, L) of ``batch[rows]`` shown in ``orders``."""
        return self.evaluator.click_probability(batch[rows].reorder(orders))

    def _advantage(self, gains: Tensor, initial: Tensor, rows: Tensor) -> Tensor:
        return discounted_returns(gains - initial[rows], self.config.gamma)

    def _unit(
        self, space, delta: dict[str, Tensor], rows: Tensor, order: Tensor, advantage: Tensor
    ) -> dict[str, Tensor]:
        """The unit offset from the gradient of Σ_t A_t log π(a_t), over the first ``grad_steps`` steps if set."""
        steps = self.config.grad_steps or order.shape[1]
        return space.unit(delta, rows, order[:, :steps], advantage[:, :steps])

    def __call__(self, batch: ListBatch, generator: torch.Generator | None = None) -> Reranked:
        with torch.inference_mode():  # less per-operation overhead than no_grad; the gradient step leaves it
            out = self._rerank(batch, generator)
        return Reranked(*_ordinary(*out))  # ordinary tensors: callers may modify them in place

    def _rerank(self, batch: ListBatch, generator: torch.Generator | None) -> Reranked:
        c = self.config
        device = next(self.generator.parameters()).device
        batch = batch.to(device)
        size, length = batch.mask.shape
        x = self.generator.inputs(batch)
        space = (
            _Activations(self.generator.net, x, batch.mask, c.scale)
            if c.offsets == "activations"
            else _Weights(self._own_net(), x, batch.mask, c.scale, c.offsets)
        )
        rows = torch.arange(size, device=device)
        identity = rows.new_tensor(range(length)).expand(size, -1)
        greedy = space.decode(space.zero(rows), rows, None)
        if (c.mode == "parallel" and c.steps) or (c.mode == "serial" and c.serial_steps):
            # the initial order's gains are the baseline of the advantages; evaluated with the greedy list's
            both = self._gains(batch, torch.cat([rows, rows]), torch.cat([identity, greedy]))
            initial, greedy_gains = both[:size], both[size:]
        else:  # generator only: no gradient, so no advantage to take
            greedy_gains = self._gains(batch, rows, greedy)
        orders, gains = [greedy], [greedy_gains]
        if c.mode == "parallel" and c.steps:
            unit = self._unit(space, space.zero(rows), rows, greedy, self._advantage(greedy_gains, initial, rows))
            k = len(c.steps)
            rep = rows.repeat_interleave(k)  # request of each candidate row, candidates of a request adjacent
            steps = torch.tensor(c.steps, device=device, dtype=x.dtype).repeat(size)
            delta = {n: u[rep] * steps.view(-1, *([1] * (u.dim() - 1))) for n, u in unit.items()}
            noise = gumbel((size * k, length, length), generator, device)
            if c.batched:
                sampled = space.decode(delta, rep, noise)
            else:  # one candidate at a time, with the same offsets and noise
                sampled = torch.stack(
                    [
                        space.decode(
                            {n: d.view(size, k, *d.shape[1:])[:, j] for n, d in delta.items()},
                            rows,
                            noise.view(size, k, length, length)[:, j],
                        )
                        for j in range(k)
                    ],
                    1,
                )
                sampled = sampled.view(size * k, length)
            sampled_gains = self._gains(batch, rep, sampled)
            orders += list(sampled.view(size, k, length).unbind(1))
            gains += list(sampled_gains.view(size, k, length).unbind(1))
        elif c.mode == "serial":
            delta, started = space.zero(rows), time.perf_counter()
            for step in range(c.serial_steps):
                if c.serial_seconds and time.perf_counter() - started > c.serial_seconds:
                    break
                sampled = space.decode(delta, rows, gumbel((size, length, length), generator, device))
                sampled_gains = self._gains(batch, rows, sampled)
                orders.append(sampled)
                gains.append(sampled_gains)
                if step + 1 < c.serial_steps:  # the last round's update would never be used
                    unit = self._unit(space, delta, rows, sampled, self._advantage(sampled_gains, initial, rows))
                    delta = {n: delta[n] + c.serial_step * unit[n] for n in delta}
        lengths = batch.mask.sum(1, keepdim=True).clamp_min(1)
        candidates = torch.stack([g.sum(1) for g in gains], 1) / lengths  # (B, C) evaluator scores
        if c.select == "oracle":
            criterion = torch.stack([self._ndcg(batch, o) for o in orders], 1)
        else:
            criterion = candidates
        winner = criterion.argmax(1)  # ties go to the earliest candidate: the greedy list first
        order = torch.stack(orders, 1)[rows, winner]  # (B, L)
        return Reranked(order, order_scores(order, batch.mask), candidates[rows, winner], winner, candidates)

    @staticmethod
    def _ndcg(batch: ListBatch, order: Tensor) -> Tensor:
        shown = batch.reorder(order)
        return ndcg_gains(shown.label, shown.mask.float(), batch.label, batch.mask.float()).sum(1)


def load_last(run: str | Path, config: LastConfig | None = None, device: torch.device | str = "cpu") -> Last:
    """LAST over a run directory holding ``generator/`` and ``evaluator/`` (the outputs of `relist train
    generator --out RUN/generator` and `relist train evaluator --out RUN/evaluator`; what `relist serve RUN`
    serves), with ``config`` (the defaults if None)."""
    from relist.rerankers.base import load_reranker
    from relist.rerankers.evaluator import load_evaluator

    run = Path(run)
    missing = [name for name in ("generator", "evaluator") if not (run / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{run} is not a LAST run: no {' or '.join(m + '/' for m in missing)} (write them with `relist train "
            f"generator --out {run}/generator` and `relist train evaluator --out {run}/evaluator`)"
        )
    generator = load_reranker(run / "generator")
    if not isinstance(generator, Generator):
        raise ValueError(f"{run}/generator holds a {generator.name!r} model, not a generator")
    return Last(generator.to(device), load_evaluator(run / "evaluator").to(device), config)


def weights_hash(*modules: torch.nn.Module) -> str:
    """SHA-256 of the modules' parameters and buffers in a fixed order: what "the deployed weights never
    change" is checked against (tests, the demo, the serving benchmark's in-process runs)."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
