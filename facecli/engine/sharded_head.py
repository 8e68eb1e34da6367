"""A margin head whose class-weight matrix is split across ranks (Partial FC style, no sampling).

For tens of thousands to millions of identities the (C, D) weight matrix, its optimizer
state and the (B, C) logits dominate a GPU's memory. With ``--sharded-head`` under torchrun,
rank r holds only classes ``[start_r, end_r)`` (a near-equal split) and:

1. all-gathers the embeddings and labels of the global batch (the gather's backward sums
   the embedding gradients of all ranks and returns this rank's rows);
2. computes its (B_global, C_r) cosines in float32 and its logits with the unsharded
   head's own ``logits_from_cos`` (labels outside the shard are -1; a head that
   ``needs_global_target_cosines`` gets them, so CurricularFace's ``t`` update, a mean over
   the global batch, is the same on every rank; a head that ``needs_embedding_norm`` gets the
   gathered rows' norms, so AdaFace's statistics are the global batch's on every rank);
3. combines the softmax across ranks: the row maximum by an all-reduce MAX (detached), the
   sum of exponentials and the target logit by all-reduce SUMs whose backward is the
   identity (the loss is replicated: each rank back-propagates its own addends).

The loss is the mean cross-entropy over the global batch, equal to the unsharded head's to
float tolerance, identical on every rank, with exact gradients for this rank's weights and
this rank's part of the embedding gradient. The trainer therefore sums (does not average)
the network's gradients over ranks (:func:`facecli.engine.distributed.allreduce_sum_hook`).

Checkpoints hold the *full* weight matrix and optimizer state (gathered on rank 0), in the
unsharded head's format: evaluation, ``facecli.load_model`` and single-process use read
them unchanged, and a sharded run resumes by slicing them again.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import Tensor, nn

from facecli.engine.distributed import World
from facecli.errors import CheckpointError, UserError
from facecli.losses import build_head

# Up to this many weights, the shard is cut from a full matrix drawn exactly as the unsharded
# head draws it, so --sharded-head does not change a run. Beyond it, drawing the full matrix
# on every rank would cost too much host memory: each rank draws its rows from generators
# seeded per block of rows (the same weights for any number of ranks).
EXACT_INIT_MAX_ELEMENTS = 1 << 27
_INIT_BLOCK_ROWS = 4096
_INIT_STD = 0.01


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Classes ``[start, end)`` of ``rank``: near-equal contiguous slices (sizes differ by <= 1)."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class _GatherRows(torch.autograd.Function):
    """All-gather rows of every rank; the backward sums the gradient over ranks and keeps our rows."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: tuple[int, ...], rank: int) -> Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        return _all_gather_rows(x.detach(), sizes)

    @staticmethod
    def backward(ctx, grad: Tensor):
        g = grad.detach().contiguous().clone()
        dist.all_reduce(g)
        start = sum(ctx.sizes[: ctx.rank])
        return g[start : start + ctx.sizes[ctx.rank]], None, None


class _SumOverRanks(torch.autograd.Function):
    """All-reduce SUM whose backward is the identity: each rank back-propagates its own addend
    of a loss that is replicated on every rank."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = x.detach().clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def _all_gather_rows(x: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """Concatenate ``x`` of every rank along dim 0 (ranks may hold different numbers of rows)."""
    most = max(sizes)
    padded = x.contiguous()
    if x.shape[0] < most:
        padded = torch.cat([padded, padded.new_zeros((most - x.shape[0],) + tuple(x.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _gather_rows_to_main(x: Tensor, sizes: tuple[int, ...], rank: int) -> Tensor | None:
    """The rows of every rank concatenated on rank 0 (on the CPU); None elsewhere."""
    most = max(sizes)
    padded = x.detach().contiguous()
    if x.shape[0] < most:
        padded = torch.cat([padded, padded.new_zeros((most - x.shape[0],) + tuple(x.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in sizes] if rank == 0 else None
    dist.gather(padded, parts, dst=0)
    if rank != 0:
        return None
    return torch.cat([p[:n].cpu() for p, n in zip(parts, sizes)])


class ShardedMarginHead(nn.Module):
    """One rank's shard of a margin head; ``forward``/``loss`` return the global-batch loss."""

    sharded = True
    shardable = True
    batch_sizes: tuple[int, ...] | None = None  # every rank's batch of the next forward, if known
    sampler = None  # Partial FC's ClassSampler (sample_classes), or None: every class every step
    sample = None  # the sampled rows of the last training forward, until the update

    def __init__(self, name: str, embedding_dim: int, num_classes: int, world: World, **hparams):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise UserError("--sharded-head needs a process group: start the run with torchrun.")
        if num_classes < world.world_size:
            raise UserError(
                f"--sharded-head splits the {num_classes} classes over {world.world_size} processes; each needs at least one.",
                hint="Use fewer processes or train without --sharded-head.",
            )
        self.world = world
        self.num_classes = int(num_classes)
        self.embedding_dim = int(embedding_dim)
        self.sizes = tuple(b - a for a, b in (shard_range(num_classes, r, world.world_size) for r in range(world.world_size)))
        self.start, self.end = shard_range(num_classes, world.rank, world.world_size)
        rows = self._initial_rows()  # first, so the global RNG advances as for the unsharded head
        with torch.random.fork_rng(devices=[]):
            self.local = build_head(name, embedding_dim, self.end - self.start, **hparams)
        with torch.no_grad():
            self.local.weight.copy_(rows)

    @property
    def weight(self) -> Tensor:
        """This rank's rows of the class weights (classes ``start`` .. ``end - 1``)."""
        return self.local.weight

    def _initial_rows(self) -> Tensor:
        d = self.embedding_dim
        if self.num_classes * d <= EXACT_INIT_MAX_ELEMENTS:
            # The same draw from the global RNG as the unsharded head's nn.init.normal_ (every
            # rank's RNG is in the same state here), then our rows.
            full = torch.empty(self.num_classes, d)
            nn.init.normal_(full, 0.0, _INIT_STD)
            return full[self.start : self.end]
        base = int(torch.randint(0, 2**62, (1,)).item())  # same on every rank
        rows = []
        for block in range(self.start // _INIT_BLOCK_ROWS, (self.end - 1) // _INIT_BLOCK_ROWS + 1):
            b0 = block * _INIT_BLOCK_ROWS
            b1 = min(b0 + _INIT_BLOCK_ROWS, self.num_classes)
            g = torch.Generator().manual_seed(base + block)
            w = torch.randn(b1 - b0, d, generator=g) * _INIT_STD
            rows.append(w[max(self.start, b0) - b0 : min(self.end, b1) - b0])
        return torch.cat(rows)

    def hparams(self) -> dict:
        return self.local.hparams()

    def extra_repr(self) -> str:
        return f"classes [{self.start}, {self.end}) of {self.num_classes} on rank {self.world.rank}/{self.world.world_size}"

    # ------------------------------------------------------------------ loss
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy over the global batch (a 0-dim float32 tensor, identical on every rank)."""
        device = embeddings.device
        sizes = self.batch_sizes or self._gather_sizes(embeddings)
        self.batch_sizes = None  # one forward's: the trainer sets them again for the next step
        emb = _GatherRows.apply(embeddings.float(), sizes, self.world.rank)
        y = _all_gather_rows(labels.to(device=device, dtype=torch.long), sizes)

        mine = (y >= self.start) & (y < self.end)
        local_y = torch.where(mine, y - self.start, torch.full_like(y, -1))
        cos, local_y = self._cosines(emb, local_y)  # float32 (B, C_r or sampled), autocast off
        target_cos = None
        if self.local.needs_global_target_cosines:
            with torch.no_grad():
                own = cos.gather(1, local_y.clamp_min(0).unsqueeze(1)).squeeze(1)
                target_cos = torch.where(mine, own, torch.zeros_like(own))
                dist.all_reduce(target_cos)
        norms = self.local.embedding_norms(emb) if self.local.needs_embedding_norm else None
        logits = self._unsampled_out(self.local.logits_from_cos(cos, local_y, target_cos=target_cos, norms=norms))

        with torch.no_grad():
            top = logits.max(dim=1).values
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
        sum_exp = _SumOverRanks.apply(torch.exp(logits - top.unsqueeze(1)).sum(dim=1))
        picked = logits.gather(1, local_y.clamp_min(0).unsqueeze(1)).squeeze(1)
        target = _SumOverRanks.apply(torch.where(mine, picked, torch.zeros_like(picked)))
        loss = (torch.log(sum_exp) + top - target).mean()
        return loss + self._norm_penalty(embeddings, len(y))

    def _norm_penalty(self, embeddings: Tensor, total: int) -> Tensor | float:
        """The head's per-row ``norm_penalty`` (MagFace's g) averaged over the global batch. Each
        rank adds its own rows' terms (on its un-gathered embeddings: their gradient counted once)."""
        if not self.local.needs_embedding_norm:
            return 0.0
        mine = self.local.norm_penalty(self.local.embedding_norms(embeddings))
        if mine is None:
            return 0.0
        return _SumOverRanks.apply(mine.sum()) / total

    def loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self(embeddings, labels)

    # ------------------------------------------------------------------ Partial FC sampling
    def sample_classes(self, rate: float, seed: int) -> None:
        """From now on, training steps compute only a sample of this rank's classes
        (:mod:`facecli.engine.partial_fc`; seeded per rank and step)."""
        from facecli.engine.partial_fc import ClassSampler

        self.sampler = ClassSampler(rate, self.end - self.start, seed, self.world.rank)

    def start_step(self, step: int) -> None:
        if self.sampler is not None:
            self.sampler.step = step

    def _cosines(self, emb: Tensor, local_y: Tensor) -> tuple[Tensor, Tensor]:
        """Cosines with this rank's classes, or its sampled ones with the labels as their columns."""
        if self.sampler is None or not (self.training and torch.is_grad_enabled()):
            self.sample = None
            return self.local.cosine(emb), local_y
        from facecli.engine.partial_fc import draw_sample

        self.sample, columns = draw_sample(self.sampler, self.local.weight, local_y)
        return self.local.cosine(emb, self.sample.rows), columns

    def _unsampled_out(self, logits: Tensor) -> Tensor:
        if self.sample is None:
            return logits
        from facecli.engine.partial_fc import mask_unsampled

        return mask_unsampled(logits, self.sample)

    def optimizer_rows(self, optimizer: torch.optim.Optimizer):
        """Around the update: the optimizer sees only the sampled rows (see ``partial_fc.sampled_rows``)."""
        from facecli.engine.partial_fc import sampled_rows

        sample, self.sample = self.sample, None
        return sampled_rows(self.local.weight, optimizer, sample)

    def _gather_sizes(self, embeddings: Tensor) -> tuple[int, ...]:
        """Every rank's batch size, read from the device (the trainer passes ``batch_sizes``
        it agreed on the host instead, so its steps never wait here)."""
        n = torch.tensor([embeddings.shape[0]], dtype=torch.long, device=embeddings.device)
        counts = [torch.empty_like(n) for _ in range(self.world.world_size)]
        dist.all_gather(counts, n)
        return tuple(int(c.item()) for c in counts)

    # ------------------------------------------------------------------ checkpoints
    def full_state_dict(self) -> dict | None:
        """The unsharded head's state dict (full (C, D) weight, buffers) on rank 0; None elsewhere.

        A collective: every rank must call it.
        """
        state = self.local.state_dict()
        full = _gather_rows_to_main(state["weight"], self.sizes, self.world.rank)
        if not self.world.is_main:
            return None
        out = {k: v.detach().cpu().clone() for k, v in state.items() if k != "weight"}
        out["weight"] = full
        return out

    def load_full_state_dict(self, state: dict) -> None:
        """Load this rank's rows from an unsharded head's state dict (as written by :meth:`full_state_dict`)."""
        weight = state.get("weight")
        if weight is None or tuple(weight.shape) != (self.num_classes, self.embedding_dim):
            found = None if weight is None else tuple(weight.shape)
            raise CheckpointError(
                f"The checkpoint's head weights have shape {found}, expected {(self.num_classes, self.embedding_dim)}."
            )
        local = dict(state)
        local["weight"] = weight[self.start : self.end]
        self.local.load_state_dict(local)

    def _param_index(self, optimizer: torch.optim.Optimizer) -> int:
        """The index of our weight in ``optimizer.state_dict()['state']``."""
        index = 0
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p is self.local.weight:
                    return index
                index += 1
        raise ValueError("the sharded head's weight is not in this optimizer")

    def gather_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """``optimizer.state_dict()`` with the head's per-row state (momentum, Adam moments) gathered
        to the full (C, D) shape, on rank 0 (None elsewhere): what a one-process run would save.

        A collective: every rank must call it.
        """
        sd = optimizer.state_dict()
        idx = self._param_index(optimizer)
        shard_state = sd["state"].get(idx, {})
        full_state = {}
        for key in sorted(shard_state):
            value = shard_state[key]
            if isinstance(value, Tensor) and tuple(value.shape) == tuple(self.local.weight.shape):
                full_state[key] = _gather_rows_to_main(value, self.sizes, self.world.rank)
            else:
                full_state[key] = copy.deepcopy(value)
        if not self.world.is_main:
            return None
        state = dict(sd["state"])
        if idx in state:
            state[idx] = full_state
        return {"state": state, "param_groups": sd["param_groups"]}

    def scatter_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a full optimizer state dict (one-process layout), keeping this rank's rows of the head's."""
        idx = self._param_index(optimizer)
        per_param = dict(state["state"])
        if idx in per_param:
            full_shape = (self.num_classes, self.embedding_dim)
            mine = {}
            for key, value in per_param[idx].items():
                if isinstance(value, Tensor) and tuple(value.shape) == full_shape:
                    value = value[self.start : self.end].clone()
                elif isinstance(value, Tensor) and value.dim() == 2:
                    raise CheckpointError(
                        f"The checkpoint's optimizer state for the head has shape {tuple(value.shape)}, expected {full_shape}."
                    )
                mine[key] = value
            per_param[idx] = mine
        optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
