"""The list generator of LAST (arXiv 2406.14004): a pointer network that builds a list position by position.

The official code's "CMR generator" without its hypernetwork: a per-item DNN encoder (200 units), a
GRU decoder (32 units) whose state queries the encoder states through 2-head attention, and a pointer
that scores every item not yet chosen (chosen items and padding are masked). It exposes the
log-probability of any order (teacher forcing: step by step through the decoding loop, or in one pass
over the steps with ``PointerNet.teacher_forced``, which LAST's gradient uses), greedy decoding and sampling.

Training is reward-weighted cross-entropy: sample an order, reward each position by the change in
NDCG gain against the initial order at that position, r_t = g(sampled)_t − g(initial)_t, and weight the
log-probability of step t by the discounted return R_t = Σ_{k≥t} γ^{k−t} r_k with γ = 0.3. With
``reward="evaluator"`` the per-position gain is the evaluator's click probability instead of the label's
NDCG gain (the variant that needs no labels).

The decoding network is the submodule ``net`` (a ``PointerNet``) and is a pure function of its inputs:
sampling takes Gumbel noise as an argument, so the same noise gives the same list, and LAST can run it
under ``torch.func`` with per-request weights or add offsets to its activations without touching the
module. Deviations: the decoder's initial state is a linear map of the mean encoder state (the official
code uses the final state of an RNN over the items); the GRU cell and the attention are written out with
linear layers so that ``torch.func.vmap`` can batch them over per-request weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from relist.batch import ListBatch, concat
from relist.nn import NEG_INF
from relist.rerankers.base import Encoded, Reranker, RerankerConfig, register

REWARDS = ("ndcg", "evaluator")


@dataclass
class GeneratorConfig(RerankerConfig):
    encoder: int = 200  # per-item DNN width (official)
    hidden: int = 32  # GRU decoder width (official)
    heads: int = 2  # attention heads of the decoder (official)
    gamma: float = 0.3  # discount of later positions' rewards (official)
    samples: int = 1  # sampled orders per list and training step
    reward: str = "ndcg"  # "ndcg" (labels) or "evaluator" (the evaluator's click probabilities)
    initial_skip: bool = False  # the initial score is an item feature the encoder reads


def gumbel(shape: tuple[int, ...], generator: torch.Generator | None = None, device=None) -> Tensor:
    """Gumbel(0, 1) noise; argmax(logits + noise) samples from softmax(logits)."""
    u = torch.rand(shape, generator=generator).clamp(1e-10, 1 - 1e-7)
    return (-torch.log(-torch.log(u))).to(device)


class GRUSequence(torch.autograd.Function):
    """A GRU over a whole sequence, ``apply(inputs (N, T, H_in), h0 (N, H), w_ih, w_hh, b_ih, b_hh)`` → (N, T, H).

    The gates of ``PointerNet._gru`` (and of ``torch.nn.GRU``, whose op runs the forward). The backward pass
    needs no graph of the T steps: with the states known, the gates of every step are recomputed at once,
    and so is each step's Jacobian M_t = ∂h_t/∂h_{t−1} (H × H); what stays sequential is the linear
    recurrence G_{t−1} = g_{t−1} + M_tᵀ G_t of the total gradients, one batched matrix-vector product per
    step instead of a dozen autograd nodes. Equal to autograd through the cells to float rounding (tested).
    """

    @staticmethod
    def forward(ctx, inputs, h0, w_ih, w_hh, b_ih, b_hh):
        hs, _ = torch.gru(inputs, h0[None].contiguous(), [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, False, False, True)
        ctx.save_for_backward(inputs, h0, w_ih, w_hh, b_ih, b_hh, hs)
        return hs

    @staticmethod
    def backward(ctx, grad_hs):
        inputs, h0, w_ih, w_hh, b_ih, b_hh, hs = ctx.saved_tensors
        n, steps, width = hs.shape
        previous = torch.cat([h0[:, None], hs[:, :-1]], 1)  # h_{t−1} (N, T, H)
        xr, xz, xn = (inputs @ w_ih.T + b_ih).chunk(3, dim=-1)
        hr, hz, hn = (previous @ w_hh.T + b_hh).chunk(3, dim=-1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        new = torch.tanh(xn + r * hn)
        # h_t = (1 − z) n + z h_{t−1}: gradients of the pre-activations per unit of gradient of h_t
        d_n = (1 - z) * (1 - new * new)
        d_z = (previous - new) * z * (1 - z)
        d_r = d_n * hn * r * (1 - r)
        d_hidden = torch.cat([d_r, d_z, d_n * r], -1)  # of the hidden projection (r, z, n blocks) (N, T, 3H)
        # M_t[h, i] = z_t[h] 1[h = i] + Σ_g w_hh[g·H + i, h] d_hidden_t[g·H + i]: ∂h_t/∂h_{t−1}, transposed
        jac = torch.einsum("gih,ntgi->nthi", w_hh.view(3, width, width), d_hidden.view(n, steps, 3, width))
        jac = jac + torch.diag_embed(z)
        total = [grad_hs[:, -1]]
        for t in range(steps - 1, 0, -1):
            total.append(grad_hs[:, t - 1] + (jac[:, t] @ total[-1][..., None]).squeeze(-1))
        total = torch.stack(total[::-1], 1)  # G_t, the whole gradient of h_t (N, T, H)
        grad_h0 = (jac[:, 0] @ total[:, 0, :, None]).squeeze(-1)
        repeated = total.repeat(1, 1, 3)
        grad_x = repeated * torch.cat([d_r, d_z, d_n], -1)  # of the input projection (N, T, 3H)
        grad_h = repeated * d_hidden
        need = ctx.needs_input_grad
        return (
            grad_x @ w_ih if need[0] else None,
            grad_h0 if need[1] else None,
            torch.einsum("ntg,nth->gh", grad_x, inputs) if need[2] else None,
            torch.einsum("ntg,nth->gh", grad_h, previous) if need[3] else None,
            grad_x.sum((0, 1)) if need[4] else None,
            grad_h.sum((0, 1)) if need[5] else None,
        )


class PointerNet(nn.Module):
    """Encoder + pointer decoder; ``forward(x, mask, noise, order, state_offset, init_offset)``.

    Returns the order (N, L) (positions of the input, padding last) and the per-step log-probabilities
    (N, L) of the choices made (0 once the real items are exhausted). ``noise`` (N, L, L), Gumbel per step
    and item, samples; ``None`` decodes greedily; ``order`` (N, T) forces the first T choices (teacher
    forcing) and decodes only those T steps.
    The offsets are added to the encoder states (N, L, H) and the decoder's initial state (N, H).
    """

    def __init__(self, input_dim: int, encoder: int, hidden: int, heads: int):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"generator: hidden {hidden} must be divisible by heads {heads}")
        self.heads = heads
        self.encoder = nn.Sequential(nn.Linear(input_dim, encoder), nn.ReLU(), nn.Linear(encoder, hidden), nn.Tanh())
        self.init = nn.Linear(hidden, hidden)
        self.gru_x = nn.Linear(hidden, 3 * hidden)
        self.gru_h = nn.Linear(hidden, 3 * hidden)
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.pointer_key = nn.Linear(hidden, hidden, bias=False)
        self.pointer_query = nn.Linear(2 * hidden, hidden)
        self.pointer_out = nn.Linear(hidden, 1, bias=False)
        self.go = nn.Parameter(torch.zeros(hidden))

    def states(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder states (N, L, H) and the decoder's initial state (N, H)."""
        states = self.encoder(x) * mask[..., None]
        mean = states.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return states, torch.tanh(self.init(mean))

    def _gru(self, x: Tensor, h: Tensor) -> Tensor:
        rx, zx, nx = self.gru_x(x).chunk(3, dim=-1)
        rh, zh, nh = self.gru_h(h).chunk(3, dim=-1)
        r, z = torch.sigmoid(rx + rh), torch.sigmoid(zx + zh)
        return (1 - z) * torch.tanh(nx + r * nh) + z * h

    def _attend(self, h: Tensor, keys: Tensor, values: Tensor, available: Tensor) -> Tensor:
        """Multi-head attention of the state over the items still available: (N, H)."""
        return self._attend_heads(h, *self._heads(keys, values), available)

    def _heads(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Keys (N, heads, H/heads, L) and values (N, heads, L, H/heads) split by head, done once per decode."""
        n, length, width = values.shape
        k = keys.view(n, length, self.heads, -1).transpose(1, 2).transpose(-1, -2).contiguous()
        v = values.view(n, length, self.heads, -1).transpose(1, 2).contiguous()
        return k, v

    def _attend_heads(self, h: Tensor, k: Tensor, v: Tensor, available: Tensor) -> Tensor:
        n, heads, d, _ = k.shape
        q = self.query(h).view(n, heads, 1, d)
        logits = (q @ k) / d**0.5  # (N, heads, 1, L)
        logits = logits.masked_fill(~available[:, None, None, :], NEG_INF)
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        return (weights @ v).reshape(n, heads * d)

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        noise: Tensor | None = None,
        order: Tensor | None = None,
        state_offset: Tensor | None = None,
        init_offset: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        states, h = self.states(x, mask)
        if state_offset is not None:
            states = states + state_offset * mask[..., None]
        if init_offset is not None:
            h = h + init_offset
        return self.decode(states, h, mask, noise, order)

    def decode(
        self, states: Tensor, h: Tensor, mask: Tensor, noise: Tensor | None = None, order: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        n, length, _ = states.shape
        keys, pointer_keys = self.key(states), self.pointer_key(states)
        k, v = self._heads(keys, states)
        remaining = torch.ones_like(mask)
        step_input = self.go.expand(n, -1)
        chosen_all, log_p_all = [], []
        positions = torch.arange(length, device=mask.device)
        padding_order = -positions.to(pointer_keys.dtype)
        for t in range(length if order is None else order.shape[1]):
            available = remaining & mask
            live = available.any(1)  # (N,) False once the real items are exhausted
            # when no real item is left, padding is chosen in place so the order stays a permutation
            allowed = torch.where(live[:, None], available, remaining)
            h = self._gru(step_input, h)
            context = self._attend_heads(h, k, v, available)
            query = self.pointer_query(torch.cat([h, context], dim=-1))
            logits = self.pointer_out(torch.tanh(pointer_keys + query[:, None, :])).squeeze(-1)  # (N, L)
            # once only padding is left, take it in input order: the first remaining position wins
            logits = torch.where(live[:, None], logits, padding_order).masked_fill(~allowed, NEG_INF)
            log_probs = torch.log_softmax(logits, dim=-1)
            if order is not None:
                chosen = order[:, t]
            elif noise is not None:
                chosen = torch.argmax(logits + noise[:, t] * live[:, None], dim=-1)
            else:
                chosen = torch.argmax(logits, dim=-1)
            step_log_p = log_probs.gather(1, chosen[:, None]).squeeze(1)
            log_p_all.append(torch.where(live, step_log_p, torch.zeros_like(step_log_p)))
            chosen_all.append(chosen)
            remaining = remaining & (positions[None, :] != chosen[:, None])
            step_input = states.gather(1, chosen[:, None, None].expand(-1, 1, states.shape[-1])).squeeze(1)
        return torch.stack(chosen_all, 1), torch.stack(log_p_all, 1)

    def teacher_forced(self, states: Tensor, h: Tensor, mask: Tensor, order: Tensor, fused_gru: bool = True) -> Tensor:
        """Per-step log-probabilities (N, T) of a known order's first T choices, in one pass over the steps.

        Computes what ``decode(states, h, mask, order=order)[1]`` computes, up to float rounding: once the
        order is known, the decoder's inputs are known (the start token, then the states of the items
        chosen before), so the GRU runs over the whole input sequence, and the attention and the pointer of
        every step are batched matrix products with an "already chosen before step t" mask (N, T, L) in
        place of the loop's running mask. Only the GRU recurrence stays sequential (``GRUSequence``: torch's
        GRU op forward, one matrix-vector product per step backward); ``fused_gru=False`` runs it as a loop
        of cells instead, for ``torch.func`` transforms (which have no batching rule for either). Used for
        LAST's gradient, where the backward pass through a Python loop of decoding steps dominated the
        cost of a request.
        """
        n, length, width = states.shape
        steps = order.shape[1]
        positions = torch.arange(length, device=mask.device)
        picked = order[:, :, None] == positions  # (N, T, L): item chosen at step t
        remaining = (picked.cumsum(1) - picked.long()) == 0  # not chosen before step t
        available = remaining & mask[:, None, :]
        live = available.any(2)  # (N, T)
        allowed = torch.where(live[..., None], available, remaining)
        previous = states.gather(1, order[:, : steps - 1, None].expand(-1, -1, width))  # inputs of steps 1..T-1
        inputs = torch.cat([self.go.expand(n, 1, width), previous], 1)  # (N, T, H)
        if fused_gru:  # the recurrence of ``_gru``: torch's GRU op forward, a linear recurrence backward
            hs = GRUSequence.apply(inputs, h, self.gru_x.weight, self.gru_h.weight, self.gru_x.bias, self.gru_h.bias)
        else:
            hs = []
            for step_input in inputs.unbind(1):
                h = self._gru(step_input, h)
                hs.append(h)
            hs = torch.stack(hs, 1)
        d = width // self.heads
        q = self.query(hs).view(n, steps, self.heads, d).transpose(1, 2)  # (N, heads, T, d)
        k = self.key(states).view(n, length, self.heads, d).transpose(1, 2)  # (N, heads, L, d)
        v = states.view(n, length, self.heads, d).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)) / d**0.5  # (N, heads, T, L)
        logits = logits.masked_fill(~available[:, None], NEG_INF)
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        context = (weights @ v).transpose(1, 2).reshape(n, steps, width)  # (N, T, H)
        query = self.pointer_query(torch.cat([hs, context], dim=-1))
        scores = self.pointer_out(torch.tanh(self.pointer_key(states)[:, None] + query[:, :, None])).squeeze(
            -1
        )  # (N, T, L)
        scores = torch.where(live[..., None], scores, -positions.to(scores.dtype)).masked_fill(~allowed, NEG_INF)
        step_log_p = torch.log_softmax(scores, dim=-1).gather(2, order[..., None]).squeeze(2)
        return torch.where(live, step_log_p, torch.zeros_like(step_log_p))


def ndcg_gains(labels_in_order: Tensor, mask_in_order: Tensor, ideal_labels: Tensor, ideal_mask: Tensor) -> Tensor:
    """Per-position NDCG contribution (2^y − 1) / log2(t + 2) / IDCG (N, L); 0 for lists without a click."""
    length = labels_in_order.shape[1]
    discount = 1.0 / torch.log2(torch.arange(length, device=labels_in_order.device, dtype=torch.float32) + 2.0)
    gains = (torch.pow(2.0, labels_in_order) - 1.0) * mask_in_order * discount
    ideal = torch.sort(ideal_labels * ideal_mask, dim=1, descending=True).values
    idcg = ((torch.pow(2.0, ideal) - 1.0) * discount).sum(1, keepdim=True)
    return torch.where(idcg > 0, gains / idcg.clamp_min(1e-12), torch.zeros_like(gains))


def discounted_returns(rewards: Tensor, gamma: float) -> Tensor:
    """R_t = Σ_{k≥t} γ^{k−t} r_k along dim 1."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return out


@register
class Generator(Reranker):
    name = "generator"
    config_class = GeneratorConfig
    loss_kind = "softmax"
    loss_fixed = True

    def __init__(self, schema, config: GeneratorConfig | None = None):
        super().__init__(schema, config)
        c = self.config
        if c.reward not in REWARDS:
            raise ValueError(f"generator: unknown reward {c.reward!r}; valid: {', '.join(REWARDS)}")
        if c.samples < 1:
            raise ValueError(f"generator: samples must be at least 1, got {c.samples}")
        self.net = PointerNet(self.input_dim, c.encoder, c.hidden, c.heads)
        # The evaluator used as reward lives outside the module tree: it is neither trained nor saved here.
        self._reward_model: list[nn.Module] = []

    def use_evaluator(self, evaluator: nn.Module) -> None:
        """Set the (frozen) evaluator whose click probabilities are the reward when ``reward="evaluator"``."""
        evaluator.eval()
        for p in evaluator.parameters():
            p.requires_grad_(False)
        self._reward_model = [evaluator]

    def inputs(self, batch: ListBatch) -> Tensor:
        """Item features ⊕ tiled user (B, L, D): what ``net`` reads (the embeddings are not offset by LAST)."""
        return self.item_inputs(batch)[0]

    def context(self, encoded: Encoded, batch: ListBatch) -> Tensor:
        """Per-item logits of the first decoding step (what the consistency losses compare)."""
        states, h = self.net.states(encoded.items, batch.mask)
        h = self.net._gru(self.net.go.expand(batch.size, -1), h)
        ctx = self.net._attend(h, self.net.key(states), states, batch.mask)
        query = self.net.pointer_query(torch.cat([h, ctx], dim=-1))
        logits = self.net.pointer_out(torch.tanh(self.net.pointer_key(states) + query[:, None, :])).squeeze(-1)
        return logits.masked_fill(~batch.mask, 0.0)

    def position_gains(self, batch: ListBatch, orders: Tensor) -> Tensor:
        """Per-position gain (N, L) of each list shown in ``orders``: NDCG gains or evaluator click probabilities."""
        shown = batch.reorder(orders)
        if self.config.reward == "ndcg":
            return ndcg_gains(shown.label, shown.mask.float(), batch.label, batch.mask.float())
        if not self._reward_model:
            raise ValueError("generator: reward 'evaluator' needs an evaluator (use_evaluator) before training")
        with torch.no_grad():
            return self._reward_model[0].click_probability(shown)

    def objective(self, encoded: Encoded, batch: ListBatch):
        c = self.config
        x, mask = encoded.items, batch.mask
        reps = c.samples
        x_rep, mask_rep = x.repeat(reps, 1, 1), mask.repeat(reps, 1)
        batch_rep = batch if reps == 1 else _repeat(batch, reps)
        noise = gumbel((x_rep.shape[0], batch.list_len, batch.list_len), device=x.device)
        with torch.no_grad():
            orders, _ = self.net(x_rep, mask_rep, noise=noise)
        _, log_p = self.net(x_rep, mask_rep, order=orders)  # teacher-forced: gradients through every step
        identity = torch.arange(batch.list_len, device=x.device).expand(x_rep.shape[0], -1)
        both = torch.cat([orders, identity])
        gains = self.position_gains(_repeat(batch_rep, 2), both)
        rewards = gains[: len(orders)] - gains[len(orders) :]  # sampled minus initial, per position
        returns = discounted_returns(rewards, c.gamma)
        loss = -(returns.detach() * log_p).sum(1).mean()
        return self.context(encoded, batch), {"loss": loss, "reward": rewards.sum(1).mean().detach()}

    def decode(self, batch: ListBatch, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(order (B, L), log P per step (B, L)) of greedy decoding, or of sampling with ``noise``."""
        return self.net(self.inputs(batch), batch.mask, noise=noise)

    def log_prob(self, batch: ListBatch, order: Tensor) -> Tensor:
        """log P(order) per list (B,) under the generator."""
        return self.net(self.inputs(batch), batch.mask, order=order)[1].sum(1)

    @torch.no_grad()
    def score(self, batch: ListBatch) -> Tensor:
        """Greedy decoding as scores: L − t for the item chosen at step t, −inf on padding."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        work = batch.to(device)
        order, _ = self.decode(work)
        self.train(was_training)
        return order_scores(order, work.mask).to(batch.device)


def order_scores(order: Tensor, mask: Tensor) -> Tensor:
    """Scores that ``relist.batch.rank`` turns back into ``order``: L − t at position order[t]; −inf on padding."""
    length = order.shape[1]
    values = (length - torch.arange(length, device=order.device, dtype=torch.float32)).expand_as(order)
    scores = torch.empty(order.shape, device=order.device).scatter_(1, order, values)
    return scores.masked_fill(~mask, NEG_INF)


def _repeat(batch: ListBatch, times: int) -> ListBatch:
    return batch if times == 1 else concat([batch] * times)
