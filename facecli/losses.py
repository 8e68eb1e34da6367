"""Margin heads (CosFace, ArcFace, SphereFace, CurricularFace, AdaFace, MagFace, ElasticFace)
and the FaceNet triplet loss.

A head maps embeddings to float32 logits ``(B, C)`` whose cross-entropy with the labels is
the training loss. Every head shares one pipeline, kept as cheap as the no-margin floor
(normalise, one matrix multiply, scale, cross-entropy) on purpose:

1. cos = normalize(x) @ normalize(W)^T in float32, autocast off, because margins near
   cos = +-1 are destroyed by bf16/fp16 rounding (``cosine`` also clamps it to [-1, 1]; the
   training path clamps only the B target values, the only ones a margin formula reads);
2. ``logits_from_cos``: ``s * cos`` for every column, then only the B target values
   (gathered, transformed, scattered back) get the margin. Trigonometry is never run over
   the whole (B, C) matrix, which would dominate the step time for large C.
3. The (B, C) part is one fused autograd function (``_MarginLogits``): one pass over the
   matrix forward and one backward (CurricularFace's hard-negative modulation adds a few),
   with the margin's derivative at the B targets given by ``_target_and_slope`` (closed
   form for the built-in heads, forward-mode AD of ``_target`` for any other).
   No boolean-mask gathers, no full-matrix clamp, no (B, C) gather/scatter gradients.

``logits_from_cos`` also takes labels equal to -1 (the target column is not in this cos
matrix) so a class-sharded head can reuse it on its slice of W. Heads that read the
embedding's norm (AdaFace, MagFace) take each row's norm as ``norms``: the sharded head
passes those of the gathered batch, so they need no special case there.

Adding a loss is one class: a margin head decorated with ``@register_head("name")``, or any
:class:`Loss` (embeddings and labels in, a scalar loss out) with ``@register_loss("name")``.
Each declares its hyper-parameters as :class:`HParam` (name, default, range, help); the
``train`` flags and config-file keys are derived from them. FaceNet's semi-hard triplet loss
is the registered loss ``facenet``, so the trainer never asks which loss it has.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facecli.errors import UserError

__all__ = [
    "HEADS",
    "LOSSES",
    "HParam",
    "Loss",
    "TripletLoss",
    "register_loss",
    "build_loss",
    "MarginHead",
    "CosFace",
    "ArcFace",
    "SphereFace",
    "CurricularFace",
    "AdaFace",
    "MagFace",
    "ElasticFace",
    "register_head",
    "build_head",
    "semihard_triplet_loss",
]

HEADS: dict[str, type["MarginHead"]] = {}  # the margin heads (cross-entropy over class weights)
LOSSES: dict[str, type["Loss"]] = {}  # every training loss: the margin heads and the rest (FaceNet)

# Keeps the derivative of arccos / sqrt(1 - c^2) finite at exactly |c| = 1. In float32 this is
# one ulp below 1, so only |cos| == 1 itself is moved (by 1.2e-7).
_EDGE = 2.0**-23
_SIN2_FLOOR = 1e-12


@dataclass(frozen=True)
class HParam:
    """A hyper-parameter a loss declares. ``name`` is the constructor keyword (and the key in
    checkpoints); ``option`` the flag and config key, ``name`` unless that would clash with
    a training setting (CurricularFace's ``momentum`` is ``curricular_momentum``)."""

    name: str
    default: float
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    option: str = ""  # default: ``name``
    hint: str = ""  # advice added to a range error
    # An on/off switch (ElasticFace's sort): a --flag/--no-flag and true/false in config
    # files, stored as 1.0/0.0 so checkpoints keep numbers only.
    switch: bool = False

    def __post_init__(self):
        if not self.option:
            object.__setattr__(self, "option", self.name)

    def rule(self) -> str:
        lo = None if self.low is None else ("(" if self.low_open else "[") + _fmt(self.low)
        hi = None if self.high is None else _fmt(self.high) + (")" if self.high_open else "]")
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return ("> " if self.low_open else ">= ") + _fmt(self.low)
        if hi:
            return ("< " if self.high_open else "<= ") + _fmt(self.high)
        return "any number"

    def check(self, value, owner: str) -> float:
        """``value`` as a float inside the range, or a one-line UserError naming ``owner`` and the option."""
        if self.switch and isinstance(value, bool):
            value = float(value)
        number = _real(value, self.name, owner)
        problem = self.range_problem(number)
        if problem:
            raise UserError(f"{owner}: {self.option} {problem}")
        return number

    def range_problem(self, number: float) -> str | None:
        """What is wrong with ``number`` (e.g. "must be in [0, 1]; got margin 1.5. The default is 0.5."),
        or None: the one wording of a range error, for the API and for flags and config files."""
        if self.switch and number not in (0.0, 1.0):
            return f"must be on or off (true/false, 1/0); got {number:g}. {self.advice()}"
        low_bad = self.low is not None and (number <= self.low if self.low_open else number < self.low)
        high_bad = self.high is not None and (number >= self.high if self.high_open else number > self.high)
        if not (low_bad or high_bad):
            return None
        return f"must be {self.rule()}; got {self.name} {number:g}. {self.advice()}"

    def advice(self) -> str:
        default = ("on" if self.default else "off") if self.switch else f"{self.default:g}"
        return f"The default is {default}." + (f" {self.hint}" if self.hint else "")


def _fmt(x: float) -> str:
    return "pi" if x == math.pi else f"{x:g}"


def _no_autocast(device: torch.device):
    """Context that disables autocast for ``device`` (a no-op where autocast does not exist).

    A fixed set of device types, not ``torch.amp.is_autocast_available``: this runs in every
    forward, and a call dynamo cannot trace would break ``torch.compile``'s graph there.
    """
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _real(value, what: str, head: str) -> float:
    """``value`` as a finite float, or a UserError naming the head and the option."""
    if isinstance(value, bool):
        raise UserError(f"{head}: {what} must be a number, got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{head}: {what} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise UserError(f"{head}: {what} must be finite, got {value!r}.")
    return number


class _MarginLogits(torch.autograd.Function):
    """``s * f(cos)`` with each row's target column replaced by ``s * new``, in few passes over (B, C).

    ``f`` is the identity, or with ``threshold`` (B, 1) and ``t`` CurricularFace's modulation
    ``cos (t + cos)`` of the entries above the row's threshold, or with ``limit`` a clamp to
    [-limit, limit] (AdaFace's). ``new`` (B,) is the row's target value (before scaling) and
    ``slope`` (B,) its derivative with respect to the row's target cosine ``cos[i, index[i]]``;
    ``threshold`` and ``t`` get no gradient. ``new`` gets the target logit's gradient (times
    s) when it depends on more than cos_y (MagFace's margin, a function of the norm).
    """

    @staticmethod
    def forward(ctx, cos, index, new, slope, scale, t, threshold, limit=None):
        ctx.limit = limit
        if limit is not None:
            hard = cos.abs() <= limit  # here: where the clamp passes the gradient
            out = cos.clamp(-limit, limit).mul_(scale)
        elif threshold is None:
            hard = None
            out = cos * scale
        else:
            hard = cos > threshold
            out = torch.where(hard, (cos + t).mul_(cos), cos).mul_(scale)
        out.scatter_(1, index, (new * scale).unsqueeze(1).to(out.dtype))
        ctx.scale = scale
        if hard is None:
            ctx.save_for_backward(index, slope)
        elif limit is not None:
            ctx.save_for_backward(index, slope, hard)
        else:
            ctx.save_for_backward(index, slope, cos, hard, t)
        return out

    @staticmethod
    def backward(ctx, grad):
        s = ctx.scale
        if len(ctx.saved_tensors) == 2:
            index, slope = ctx.saved_tensors
            g = grad * s
        elif ctx.limit is not None:
            index, slope, inside = ctx.saved_tensors
            g = (grad * s).masked_fill_(~inside, 0.0)
        else:
            index, slope, cos, hard, t = ctx.saved_tensors
            g = torch.add(t, cos, alpha=2.0).mul_(s)  # d/dc s c (t + c); s may be a tensor (scale warm-up)
            # s as a Python number (no warm-up) stays a scalar argument: a device tensor built
            # from it would be a host-to-device copy, and a wait, in every backward.
            g = torch.where(hard, g, s.to(g.dtype) if torch.is_tensor(s) else s).mul_(grad)
        grad_y = grad.gather(1, index).squeeze(1)
        g_y = grad_y * (slope * s)
        g.scatter_(1, index, g_y.unsqueeze(1).to(g.dtype))
        g_new = grad_y * s if ctx.needs_input_grad[2] else None
        return g, None, g_new, None, None, None, None, None


class Loss(nn.Module):
    """A training loss: ``loss(embeddings, labels)`` -> scalar. What the trainer knows of a model.

    Class attributes are its capabilities: what it needs from the engine, which asks for
    them and never for a concrete class. The checkpoint methods are the interface the
    class-sharded head shares.
    """

    name: str = ""
    label: str = ""  # how messages name it (default: its registered name)
    default_embedding_dim: int = 512
    # The network L2-normalises its output (a loss on distances, FaceNet's).
    normalize_embeddings: bool = False
    # Reads each embedding's norm (AdaFace, MagFace): the network must not normalise, and
    # ``logits_from_cos`` gets the rows' norms as ``norms`` (the class-sharded head passes
    # those of the gathered global batch, with their gradient).
    needs_embedding_norm: bool = False
    # How a batch is drawn: "shuffled", or "pk" (P identities x K images).
    batch_layout: str = "shuffled"
    # Its class weights can be split across processes (engine/sharded_head.py).
    shardable: bool = False
    # Keeps running statistics of the batch (CurricularFace's t, AdaFace's norm mean and
    # std) that must follow the global batch: under DDP (loss replicated) the engine hands
    # it ``follow_global_batch``. Sharded, the head sees the gathered global batch anyway.
    batch_statistics: bool = False
    # Reads every row's target cosine (CurricularFace's t, ElasticFace+'s sort): sharded,
    # each row's cos_y goes to ``logits_from_cos(..., target_cos=...)``, also for rows whose
    # class another process holds.
    needs_global_target_cosines: bool = False
    sharded: bool = False

    def follow_global_batch(self, sum_over_ranks: Callable[[Tensor], Tensor]) -> None:
        """Under DDP: a function summing a tensor over every process (for losses with
        ``batch_statistics``; the others need nothing)."""

    def set_process_rank(self, rank: int) -> None:
        """Under DDP (loss replicated): this process's rank, so that a loss drawing random
        numbers (ElasticFace's margins) draws different ones in each process."""

    @classmethod
    def hyper_parameters(cls) -> tuple[HParam, ...]:
        return ()

    @classmethod
    def check_hparams(cls, given: dict) -> dict[str, float]:
        """Every declared hyper-parameter, validated, with defaults for those not given (None)."""
        label = cls.name or cls.__name__
        specs = {h.name: h for h in cls.hyper_parameters()}
        unknown = sorted(k for k, v in given.items() if v is not None and k not in specs)
        if unknown:
            raise UserError(f"{label}: option(s) {', '.join(unknown)} do not apply to this head.", hint=f"It accepts: {', '.join(sorted(specs)) or 'none'}.")
        return {n: h.default if given.get(n) is None else h.check(given[n], label) for n, h in specs.items()}

    def loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Abstract: the scalar training loss of a batch (every registered loss provides it)."""
        raise NotImplementedError

    def hparams(self) -> dict:
        """Hyper-parameters needed to rebuild this loss (stored in checkpoints)."""
        return {h.name: getattr(self, h.name) for h in self.hyper_parameters()}

    def full_state_dict(self) -> dict | None:
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}

    def load_full_state_dict(self, state: dict) -> None:
        self.load_state_dict(state)

    def gather_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        return optimizer.state_dict()

    def scatter_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def set_margin_weight(self, weight: float) -> None:
        """Share of the margin to apply (margin warm-up); losses without a margin ignore it."""

    def start_step(self, step: int) -> None:
        """Called before the forward of training step ``step`` (0-based, global): a loss that
        draws at random per step (Partial FC's class sampling) seeds its draw from it, so a
        resumed run draws what the uninterrupted one drew."""

    def optimizer_rows(self, optimizer: torch.optim.Optimizer):
        """Context around the optimizer update after ``backward``: a loss that computed only
        some rows of its weights (Partial FC) hands the optimizer just those rows there."""
        return contextlib.nullcontext()


class MarginHead(Loss):
    """Normalised linear classifier whose target logit gets an angular or additive margin.

    Subclasses set ``default_scale``/``default_margin`` and ``margin_range`` (low, high, open
    ends), may add hyper-parameters, and implement ``_target`` (the margin transform of cos_y,
    on B values) and, for speed, ``_target_and_slope``.
    """

    default_scale: float = 64.0
    default_margin: float = 0.0
    margin_range: tuple = (0.0, None, False, False)  # low, high, low open, high open
    shardable = True

    @classmethod
    def hyper_parameters(cls) -> tuple[HParam, ...]:
        low, high, low_open, high_open = cls.margin_range
        return (
            HParam("scale", cls.default_scale, "Scale s of the cosine logits", 0.0, None, True, hint="Typical values are 30-64."),
            HParam("margin", cls.default_margin, "Margin m of the target logit", low, high, low_open, high_open),
        )

    def __init__(self, embedding_dim: int, num_classes: int, **hparams):
        super().__init__()
        label = self.name or type(self).__name__
        for what, value in (("embedding_dim", embedding_dim), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise UserError(f"{label}: {what} must be a positive integer, got {value!r}.")
        for name, value in self.check_hparams(hparams).items():
            setattr(self, name, float(value))
        self.embedding_dim = int(embedding_dim)
        self.num_classes = int(num_classes)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.weight, 0.0, 0.01)
        # How much of the margin is applied: target = lerp(cos_y, margin target, w). 1 is the
        # paper's head; the trainer ramps it from 0 (margin warm-up). A buffer, not a float, so
        # changing it neither syncs nor recompiles; not persistent, so checkpoints are unchanged.
        self.register_buffer("margin_weight", torch.ones((), dtype=torch.float32), persistent=False)
        # The scale of the logits now: s, or during a scale warm-up lerp(warmup_scale, s, w).
        self.register_buffer("scale_now", torch.full((), self.scale, dtype=torch.float32), persistent=False)
        self.warmup_scale: float | None = None  # set by the trainer to ramp the scale in (None: s throughout)

    # -- to be provided by subclasses ------------------------------------------------------
    def _target(self, cos_y: Tensor) -> Tensor:
        """Abstract: margin-adjusted target cosine (before scaling) for the (B,) target cosines.
        Heads whose margin is per sample (AdaFace, MagFace, ElasticFace) override
        ``logits_from_cos`` instead, on the same ``_MarginLogits`` path."""
        raise NotImplementedError

    def _target_and_slope(self, cos_y: Tensor) -> tuple[Tensor, Tensor]:
        """``_target(cos_y)`` and its elementwise derivative d target / d cos_y.

        This default uses forward-mode AD (correct for any elementwise ``_target``, but with
        a fixed cost of a few milliseconds); the built-in heads override it in closed form.
        """
        return torch.func.jvp(self._target, (cos_y,), (torch.ones_like(cos_y),))

    # -- shared pipeline ---------------------------------------------------------------------
    def _raw_cosine(self, embeddings: Tensor, weight: Tensor | None = None) -> Tensor:
        """float32 cosines (B, C), not clamped (|cos| may exceed 1 by rounding); against
        ``weight`` (rows of class weights, Partial FC's sampled classes) instead of all classes if given."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"{self.name}: expected embeddings of shape (B, {self.embedding_dim}), got {tuple(embeddings.shape)}"
            )
        with _no_autocast(embeddings.device):
            w = self.weight if weight is None else weight
            return F.linear(F.normalize(embeddings.float(), dim=1), F.normalize(w.float(), dim=1))

    def cosine(self, embeddings: Tensor, weight: Tensor | None = None) -> Tensor:
        """float32 cosines (B, C) between embeddings and class weights (or ``weight``'s rows), clamped to [-1, 1]."""
        return self._raw_cosine(embeddings, weight).clamp(-1.0, 1.0)

    def embedding_norms(self, embeddings: Tensor) -> Tensor:
        """float32 L2 norms (B,) of the un-normalised embeddings, with their gradient."""
        with _no_autocast(embeddings.device):
            return embeddings.float().norm(dim=1)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """float32 logits (B, C), scale included; train with cross-entropy against ``labels``."""
        # The target cosines are clamped in logits_from_cos; a full-matrix clamp would only cost passes.
        norms = self.embedding_norms(embeddings) if self.needs_embedding_norm else None
        return self.logits_from_cos(self._raw_cosine(embeddings), labels, norms=norms)

    def norm_penalty(self, norms: Tensor | None) -> Tensor | None:
        """A per-row term (B,) added to the cross-entropy (MagFace's lambda_g g(a)), or None."""
        return None

    @staticmethod
    def _index(cos: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(valid rows, safe column index (B, 1), gathered cos at that index (B,), clamped, no grad)."""
        if labels.dim() != 1 or labels.shape[0] != cos.shape[0]:
            raise ValueError(f"expected labels of shape ({cos.shape[0]},), got {tuple(labels.shape)}")
        labels = labels.to(device=cos.device, dtype=torch.long)
        valid = labels >= 0
        index = labels.clamp_min(0).unsqueeze(1)
        # Detached: _MarginLogits carries the target column's gradient itself.
        return valid, index, cos.detach().gather(1, index).squeeze(1).clamp(-1.0, 1.0)

    def logits_from_cos(self, cos: Tensor, labels: Tensor, target_cos: Tensor | None = None, norms: Tensor | None = None) -> Tensor:
        """Scaled logits from cosines; rows labelled -1 get no margin (target elsewhere).

        ``target_cos`` is unused by stateless heads (their non-target logits do not depend on
        cos_y); ``norms`` (B,) by heads that do not ``needs_embedding_norm``.
        """
        valid, index, cos_y = self._index(cos, labels)
        if cos.requires_grad and torch.is_grad_enabled():
            target, slope = self._blend(cos_y, *self._target_and_slope(cos_y))
            slope = torch.where(valid, slope, torch.ones_like(slope))
        else:
            target, slope = self._blend(cos_y, self._target(cos_y), None)
        # Rows without a local target rewrite column 0 with its own value.
        new = torch.where(valid, target, cos_y)
        return _MarginLogits.apply(cos, index, new, slope, self._scale(), None, None)

    def _blend(self, cos_y: Tensor, target: Tensor, slope: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Target and slope with ``margin_weight`` of the margin: SphereFace's annealing of the
        margin logit towards plain cos_y, exact (lerp) at weight 1."""
        w = self.margin_weight.to(target.dtype)
        target = torch.lerp(cos_y.to(target.dtype), target, w)
        if slope is not None:
            slope = torch.lerp(torch.ones_like(slope), slope, w.to(slope.dtype))
        return target, slope

    def set_margin_weight(self, weight: float) -> None:
        """Apply ``weight`` (0..1) of the margin from the next forward on (no host sync); with
        ``warmup_scale`` set, the scale moves from it to s alongside."""
        self.margin_weight.fill_(float(weight))
        low = self.scale if self.warmup_scale is None or weight >= 1 else min(self.warmup_scale, self.scale)
        self.scale_now.fill_(low + float(weight) * (self.scale - low))  # exactly s from weight 1 on

    def _scale(self) -> float | Tensor:
        """s as a float (the paper's head), or the warm-up's scale as a 0-dim tensor (no host sync)."""
        return self.scale if self.warmup_scale is None else self.scale_now

    def loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy of the margin logits (plus the mean ``norm_penalty``, if any)."""
        norms = self.embedding_norms(embeddings) if self.needs_embedding_norm else None
        ce = F.cross_entropy(self.logits_from_cos(self._raw_cosine(embeddings), labels, norms=norms), labels)
        penalty = self.norm_penalty(norms)
        return ce if penalty is None else ce + penalty.mean()

    def extra_repr(self) -> str:
        extras = ", ".join(f"{k}={v:g}" for k, v in self.hparams().items())
        return f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, {extras}"


def _registrar(registry: dict, base: type, what: str, also: Callable | None = None) -> Callable:
    """A class decorator factory: ``@register(name)`` checks the class and enters it in ``registry``."""

    def register(name: str) -> Callable[[type], type]:
        def decorate(cls: type) -> type:
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise TypeError(f"@{what}({name!r}) must decorate a {base.__name__} subclass, got {cls!r}")
            if name in registry and registry[name] is not cls:
                raise UserError(f"@{what}({name!r}): a {'margin head' if base is MarginHead else 'loss'} named {name!r} is already registered ({registry[name].__name__}); choose another name.")
            if getattr(cls, "needs_embedding_norm", False) and cls.normalize_embeddings:
                raise TypeError(f"@{what}({name!r}): a loss that needs the embedding norm cannot have it normalised away")
            if also is not None:
                also(name)(cls)
            cls.name = name
            registry[name] = cls
            return cls

        return decorate

    return register


register_loss = _registrar(LOSSES, Loss, "register_loss")
register_loss.__doc__ = "Class decorator: make a :class:`Loss` subclass a ``facecli train`` model named ``name``."
register_head = _registrar(HEADS, MarginHead, "register_head", also=register_loss)
register_head.__doc__ = "Class decorator: make a ``MarginHead`` subclass available to ``build_head`` (and ``train``) as ``name``."


def _sin_from_cos(cos: Tensor) -> Tensor:
    """sin(theta) for theta in [0, pi], with a floor so the gradient is finite at |cos| = 1."""
    return (1.0 - cos * cos).clamp_min(_SIN2_FLOOR).sqrt()


def _arc_target(cos_y: Tensor, m: float) -> Tensor:
    """cos(theta + m), or the linear fallback cos - m sin(m) once theta + m > pi."""
    # cos(theta + m) = cos cos(m) - sin sin(m): exact, and cheaper than acos + cos.
    phi = cos_y * math.cos(m) - _sin_from_cos(cos_y) * math.sin(m)
    return torch.where(cos_y > math.cos(math.pi - m), phi, cos_y - m * math.sin(m))


def _arc_target_and_slope(cos_y: Tensor, m: float) -> tuple[Tensor, Tensor]:
    """``_arc_target`` and its derivative: cos(m) + sin(m) cos / sin (1 on the fallback branch)."""
    sin2 = 1.0 - cos_y * cos_y
    sin = sin2.clamp_min(_SIN2_FLOOR).sqrt()
    phi = cos_y * math.cos(m) - sin * math.sin(m)
    dphi = math.cos(m) + math.sin(m) * torch.where(sin2 >= _SIN2_FLOOR, cos_y / sin, torch.zeros_like(cos_y))
    arc = cos_y > math.cos(math.pi - m)
    return torch.where(arc, phi, cos_y - m * math.sin(m)), torch.where(arc, dphi, torch.ones_like(cos_y))


@register_head("cosface")
class CosFace(MarginHead):
    """Large-margin cosine loss: target s(cos_y - m)."""

    default_scale = 64.0
    default_margin = 0.35
    margin_range = (0.0, 1.0, False, False)

    def _target(self, cos_y: Tensor) -> Tensor:
        return cos_y - self.margin

    def _target_and_slope(self, cos_y: Tensor) -> tuple[Tensor, Tensor]:
        return cos_y - self.margin, torch.ones_like(cos_y)


@register_head("arcface")
class ArcFace(MarginHead):
    """Additive angular margin: target s cos(theta_y + m), linear fallback once theta_y + m > pi."""

    default_scale = 64.0
    default_margin = 0.5
    margin_range = (0.0, math.pi, False, True)

    def _target(self, cos_y: Tensor) -> Tensor:
        return _arc_target(cos_y, self.margin)

    def _target_and_slope(self, cos_y: Tensor) -> tuple[Tensor, Tensor]:
        return _arc_target_and_slope(cos_y, self.margin)


@register_head("sphereface")
class SphereFace(MarginHead):
    """Feature-normalised A-Softmax (SphereFace revived): target s psi(theta_y), real m >= 1.

    psi(theta) = (-1)^k cos(m theta) - 2k with k = floor(m theta / pi) is monotone decreasing
    on [0, pi], so the multiplicative margin stays valid for any theta.
    """

    default_scale = 30.0
    default_margin = 1.5
    margin_range = (1.0, None, False, False)

    def _target(self, cos_y: Tensor) -> Tensor:
        return self._target_and_slope(cos_y)[0]

    def _target_and_slope(self, cos_y: Tensor) -> tuple[Tensor, Tensor]:
        # d psi / d cos = sign m sin(m theta) / sin(theta), zero where the edge clamp is active.
        c = cos_y.clamp(-1.0 + _EDGE, 1.0 - _EDGE)
        m_theta = self.margin * torch.acos(c)
        k = torch.floor(m_theta.detach() / math.pi)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        inside = (cos_y >= -1.0 + _EDGE) & (cos_y <= 1.0 - _EDGE)
        slope = sign * self.margin * torch.sin(m_theta) / (1.0 - c * c).sqrt()
        return sign * torch.cos(m_theta) - 2.0 * k, torch.where(inside, slope, torch.zeros_like(slope))


@register_head("curricularface")
class CurricularFace(ArcFace):
    """ArcFace target plus adaptive re-weighting of hard negatives (cos_j > cos(theta_y + m)).

    A hard negative's logit becomes s cos_j (t + cos_j), where t tracks the mean target cosine
    (exponential moving average, updated in training mode only): easy early, harder later.
    Under DDP, ``follow_global_batch`` (called by the engine) makes t follow the global batch.
    """

    sum_over_ranks: Callable[[Tensor], Tensor] | None = None
    needs_global_target_cosines = True
    batch_statistics = True

    def follow_global_batch(self, sum_over_ranks: Callable[[Tensor], Tensor]) -> None:
        self.sum_over_ranks = sum_over_ranks  # t follows the global batch, not this process's

    @classmethod
    def hyper_parameters(cls) -> tuple[HParam, ...]:
        return super().hyper_parameters() + (
            HParam("momentum", 0.01, "CurricularFace's momentum of t, the running mean target cosine", 0.0, 1.0, option="curricular_momentum"),
        )

    def __init__(self, embedding_dim: int, num_classes: int, **hparams):
        super().__init__(embedding_dim, num_classes, **hparams)
        self.register_buffer("t", torch.zeros((), dtype=torch.float32))

    def logits_from_cos(self, cos: Tensor, labels: Tensor, target_cos: Tensor | None = None, norms: Tensor | None = None) -> Tensor:
        """As ``MarginHead.logits_from_cos``; rows labelled -1 need their cos_y in ``target_cos``."""
        valid, index, local_y = self._index(cos, labels)
        if target_cos is not None:
            cos_y = torch.where(valid, local_y, target_cos.detach().to(device=cos.device, dtype=cos.dtype))
        else:  # no host sync to check it: every label must then be a column of ``cos``
            cos_y = local_y
        m = self.margin
        need_grad = cos.requires_grad and torch.is_grad_enabled()
        target, slope = _arc_target_and_slope(cos_y, m) if need_grad else (_arc_target(cos_y, m), None)
        target, slope = self._blend(cos_y, target, slope)
        cos_m = cos_y * math.cos(m) - _sin_from_cos(cos_y) * math.sin(m)  # hardness threshold (no fallback)
        cos_m = torch.lerp(cos_y, cos_m, self.margin_weight.to(cos_m.dtype))

        if self.training and cos.shape[0]:
            with torch.no_grad():
                mean = cos_y.float().mean()
                if self.sum_over_ranks is not None:  # the global batch's mean, also for unequal batches
                    total = self.sum_over_ranks(torch.stack([cos_y.float().sum(), cos_y.new_tensor(float(cos_y.numel()))]))
                    mean = total[0] / total[1]
                self.t.copy_(self.momentum * mean + (1.0 - self.momentum) * self.t.float())
        t = self.t.to(cos.dtype).clone()  # a snapshot: the buffer may change before backward

        # Rows without a local target rewrite column 0 with its own (possibly modulated) value.
        hard_y = local_y > cos_m
        new = torch.where(valid, target, torch.where(hard_y, local_y * (t + local_y), local_y))
        if slope is not None:
            slope = torch.where(valid, slope, torch.where(hard_y, t + 2.0 * local_y, torch.ones_like(local_y)))
        return _MarginLogits.apply(cos, index, new, slope, self._scale(), t, cos_m.unsqueeze(1))


_ADA_EPS = 1e-3  # AdaFace's released eps: the cosine clamp, the std guard, the angle clip


@register_head("adaface")
class AdaFace(MarginHead):
    """AdaFace (Kim et al., CVPR 2022): a margin that adapts to image quality, read from the norm.

    As the authors' released ``head.py`` with the training script's t_alpha = 0.01: every
    cosine clamped to +-(1 - 1e-3); the norms a clipped to [1e-3, 100] and detached; running
    mean and std of the norms (buffers starting at 20 and 100, std unbiased) updated with the
    batch before they are used; z = clip(h (a - mean) / (std + 1e-3), -1, 1); target
    cos(clip(theta_y - m z, 1e-3, pi - 1e-3)) - (m + m z). High-quality faces (large norm)
    get an angular margin, low-quality ones a smaller additive one. Under DDP the statistics
    are those of the global batch (``follow_global_batch``); sharded, of the gathered batch.
    """

    default_scale = 64.0
    default_margin = 0.4
    margin_range = (0.0, 1.0, False, False)
    needs_embedding_norm = True
    batch_statistics = True
    sum_over_ranks: Callable[[Tensor], Tensor] | None = None

    @classmethod
    def hyper_parameters(cls) -> tuple[HParam, ...]:
        return super().hyper_parameters() + (
            HParam("h", 0.333, "AdaFace's h: how much the norm's z-score moves the margin", 0.0, None, option="adaface_h"),
            HParam("t_alpha", 0.01, "AdaFace's momentum of the running mean and std of the norms", 0.0, 1.0, option="adaface_t_alpha"),
        )

    def __init__(self, embedding_dim: int, num_classes: int, **hparams):
        super().__init__(embedding_dim, num_classes, **hparams)
        self.register_buffer("batch_mean", torch.full((), 20.0, dtype=torch.float32))
        self.register_buffer("batch_std", torch.full((), 100.0, dtype=torch.float32))

    def follow_global_batch(self, sum_over_ranks: Callable[[Tensor], Tensor]) -> None:
        self.sum_over_ranks = sum_over_ranks  # the norms' statistics over the global batch

    @torch.no_grad()
    def _update_statistics(self, safe: Tensor) -> None:
        """The released update, with the batch's mean and unbiased std (global under DDP).
        A batch of one has no std: the running std is then kept (the released code stores NaN)."""
        if self.sum_over_ranks is None:
            mean = safe.mean()
            std = safe.std() if safe.numel() > 1 else self.batch_std
        else:
            total = self.sum_over_ranks(torch.stack([safe.sum(), safe.new_tensor(float(safe.numel()))]))
            mean = total[0] / total[1]
            squares = self.sum_over_ranks(((safe - mean) ** 2).sum())
            std = torch.where(total[1] > 1, (squares / (total[1] - 1).clamp_min(1)).sqrt(), self.batch_std)
        a = self.t_alpha
        self.batch_mean.copy_(mean * a + (1 - a) * self.batch_mean)
        self.batch_std.copy_(std * a + (1 - a) * self.batch_std)

    def logits_from_cos(self, cos: Tensor, labels: Tensor, target_cos: Tensor | None = None, norms: Tensor | None = None) -> Tensor:
        """As ``MarginHead.logits_from_cos``, with every row's embedding norm in ``norms`` (B,)."""
        if norms is None:
            raise ValueError("adaface: logits_from_cos needs each row's embedding norm (norms=...)")
        valid, index, cos_y = self._index(cos, labels)
        limit = 1.0 - _ADA_EPS
        c = cos_y.clamp(-limit, limit)
        inside = (cos_y >= -limit) & (cos_y <= limit)
        safe = norms.detach().to(device=cos.device, dtype=torch.float32).clamp(_ADA_EPS, 100.0)
        if self.training and safe.numel():
            self._update_statistics(safe)
        z = ((safe - self.batch_mean) / (self.batch_std + _ADA_EPS) * self.h).clamp(-1.0, 1.0).to(c.dtype)
        m = self.margin
        theta = torch.acos(c)
        shifted = theta - m * z
        theta_m = shifted.clamp(_ADA_EPS, math.pi - _ADA_EPS)
        target = torch.cos(theta_m) - (m + m * z)
        free = inside & (shifted >= _ADA_EPS) & (shifted <= math.pi - _ADA_EPS)
        slope = torch.where(free, torch.sin(theta_m) / (1.0 - c * c).sqrt(), torch.zeros_like(c))
        w = self.margin_weight.to(c.dtype)
        target, slope = torch.lerp(c, target, w), torch.lerp(inside.to(c.dtype), slope, w)
        # Rows without a local target rewrite column 0 with its own (clamped) value.
        new = torch.where(valid, target, c)
        slope = torch.where(valid, slope, inside.to(slope.dtype))
        return _MarginLogits.apply(cos, index, new, slope, self._scale(), None, None, limit)


@register_head("magface")
class MagFace(MarginHead):
    """MagFace (Meng et al., CVPR 2021): the norm a is a quality score, trained to be one.

    As the released ``MagLinear``/``MagLoss``: a clamped to [l_a, u_a], the margin
    m(a) = l_m + (u_m - l_m) (a - l_a) / (u_a - l_a) linear in it, ArcFace's target
    cos(theta_y + m(a)) where cos_y > 0 and cos_y elsewhere (the "easy margin"), and the loss
    the cross-entropy plus lambda_g times the batch mean of g(a) = 1/a + a/u_a^2. The
    gradient reaches a through the margin and through g (not detached, as released).
    """

    default_scale = 64.0
    needs_embedding_norm = True

    @classmethod
    def hyper_parameters(cls) -> tuple[HParam, ...]:
        return (
            HParam("scale", cls.default_scale, "Scale s of the cosine logits", 0.0, None, True, hint="Typical values are 30-64."),
            HParam("l_a", 10.0, "MagFace's lower bound of the feature norm", 0.0, None, True, option="magface_l_a"),
            HParam("u_a", 110.0, "MagFace's upper bound of the feature norm", 0.0, None, True, option="magface_u_a"),
            HParam("l_m", 0.45, "MagFace's margin at the lower norm bound", 0.0, math.pi / 2, option="magface_l_m"),
            HParam("u_m", 0.8, "MagFace's margin at the upper norm bound", 0.0, math.pi / 2, option="magface_u_m"),
            HParam("lambda_g", 35.0, "MagFace's weight of the norm regulariser g(a)", 0.0, None, option="magface_lambda_g"),
        )

    def __init__(self, embedding_dim: int, num_classes: int, **hparams):
        super().__init__(embedding_dim, num_classes, **hparams)
        if not self.u_a > self.l_a:
            raise UserError(f"magface: magface_u_a ({self.u_a:g}) must be above magface_l_a ({self.l_a:g}).", hint="The defaults are 10 and 110.")

    def _clamped_norms(self, norms: Tensor | None, like: Tensor) -> Tensor:
        if norms is None:
            raise ValueError("magface: needs each row's embedding norm (norms=...)")
        return norms.to(device=like.device, dtype=like.dtype).clamp(self.l_a, self.u_a)

    def logits_from_cos(self, cos: Tensor, labels: Tensor, target_cos: Tensor | None = None, norms: Tensor | None = None) -> Tensor:
        """As ``MarginHead.logits_from_cos``, with every row's embedding norm in ``norms`` (B,)."""
        valid, index, cos_y = self._index(cos, labels)
        a = self._clamped_norms(norms, cos_y)
        m = self.l_m + (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a)
        sin2 = 1.0 - cos_y * cos_y
        sin = sin2.clamp_min(_SIN2_FLOOR).sqrt()
        easy = cos_y > 0
        target = torch.where(easy, cos_y * torch.cos(m) - sin * torch.sin(m), cos_y)
        with torch.no_grad():
            ratio = torch.where(sin2 >= _SIN2_FLOOR, cos_y / sin, torch.zeros_like(cos_y))
            slope = torch.where(easy, torch.cos(m) + torch.sin(m) * ratio, torch.ones_like(cos_y))
        target, slope = self._blend(cos_y, target, slope)
        new = torch.where(valid, target, cos_y)
        slope = torch.where(valid, slope, torch.ones_like(slope))
        return _MarginLogits.apply(cos, index, new, slope, self._scale(), None, None)

    def norm_penalty(self, norms: Tensor | None) -> Tensor:
        """lambda_g g(a) per row, g(a) = 1/a + a/u_a^2 on the clamped norm (MagLoss.calc_loss_G)."""
        a = self._clamped_norms(norms, norms.float() if norms is not None else None)
        return self.lambda_g * (a / self.u_a**2 + 1.0 / a)


@register_head("elasticface")
class ElasticFace(MarginHead):
    """ElasticFace-Arc (Boutros et al., CVPRW 2022): ArcFace with a margin drawn per sample.

    In training every row's margin is drawn from N(m, sigma) (m = 0.5, sigma = 0.05) and its
    target is cos(theta_y + m_i), without ArcFace's fallback, as released. With ``sort``
    (ElasticFace+) the drawn margins are sorted against the target cosines: the row closest
    to its class gets the smallest margin, the farthest the largest (the released code indexes
    the sorted margins with the argsort itself, which is that assignment only when the
    permutation is its own inverse; this is the paper's). In evaluation the margin is m.
    The draws come from a generator seeded by ``torch.initial_seed()`` (the run's seed) and
    a draw counter kept in the state dict, so a resumed run draws what the uninterrupted one
    would; under DDP each process draws its own (``set_process_rank``); sharded, every rank
    draws the global batch's margins, and ElasticFace+ sorts on the global target cosines.
    """

    default_scale = 64.0
    default_margin = 0.5
    margin_range = (0.0, math.pi, False, True)
    needs_global_target_cosines = True  # ElasticFace+ sorts the global batch's target cosines

    @classmethod
    def hyper_parameters(cls) -> tuple[HParam, ...]:
        return super().hyper_parameters() + (
            HParam("margin_std", 0.05, "ElasticFace's standard deviation of the per-sample margin", 0.0, None, option="elastic_std"),
            HParam("sort", 0.0, "ElasticFace+: the rows closest to their class get the smallest margins", switch=True, option="elastic_sort"),
        )

    def __init__(self, embedding_dim: int, num_classes: int, **hparams):
        super().__init__(embedding_dim, num_classes, **hparams)
        self._seed = int(torch.initial_seed())  # the run's seed, without consuming the global RNG
        self._draws = 0
        self._rank = 0

    def get_extra_state(self) -> Tensor:
        return torch.tensor([self._seed, self._draws], dtype=torch.int64)

    def set_extra_state(self, state: Tensor) -> None:
        self._seed, self._draws = (int(v) for v in state.tolist())

    def set_process_rank(self, rank: int) -> None:
        self._rank = int(rank)

    def draw_margins(self, n: int) -> Tensor:
        """The next ``n`` margins (float32, CPU) from N(m, sigma): one draw per training forward."""
        g = torch.Generator().manual_seed(hash((self._seed, self._draws, self._rank)) & (2**63 - 1))
        self._draws += 1
        return self.margin + self.margin_std * torch.randn(n, generator=g)

    def logits_from_cos(self, cos: Tensor, labels: Tensor, target_cos: Tensor | None = None, norms: Tensor | None = None) -> Tensor:
        """As ``MarginHead.logits_from_cos``; with ``sort``, rows labelled -1 need their cos_y in ``target_cos``."""
        valid, index, cos_y = self._index(cos, labels)
        if self.training:
            margins = self.draw_margins(cos.shape[0]).to(device=cos.device, dtype=cos_y.dtype)
            if self.sort:
                every_y = cos_y if target_cos is None else torch.where(valid, cos_y, target_cos.detach().to(cos_y))
                closest_first = torch.argsort(every_y, descending=True)
                margins = torch.empty_like(margins).scatter_(0, closest_first, margins.sort().values)
        else:
            margins = torch.full_like(cos_y, self.margin)
        sin2 = 1.0 - cos_y * cos_y
        sin = sin2.clamp_min(_SIN2_FLOOR).sqrt()
        target = cos_y * torch.cos(margins) - sin * torch.sin(margins)
        ratio = torch.where(sin2 >= _SIN2_FLOOR, cos_y / sin, torch.zeros_like(cos_y))
        slope = torch.cos(margins) + torch.sin(margins) * ratio
        target, slope = self._blend(cos_y, target, slope)
        new = torch.where(valid, target, cos_y)
        slope = torch.where(valid, slope, torch.ones_like(slope))
        return _MarginLogits.apply(cos, index, new, slope, self._scale(), None, None)


def _lookup(registry: dict, name: str, what: str):
    key = str(name).strip().lower()
    if key not in registry:
        raise UserError(f"Unknown {what} {name!r}.", hint=f"Choose one of: {', '.join(sorted(registry))}.")
    return registry[key]


def build_head(name: str, embedding_dim: int, num_classes: int, **hparams) -> MarginHead:
    """Instantiate the registered margin head ``name``; hparams set to None take the head's default."""
    return _lookup(HEADS, name, "loss head")(embedding_dim, num_classes, **hparams)


def build_loss(name: str, embedding_dim: int, num_classes: int, **hparams) -> Loss:
    """Instantiate the registered loss ``name`` (a margin head or another :class:`Loss`)."""
    return _lookup(LOSSES, name, "loss")(embedding_dim, num_classes, **hparams)


def semihard_triplet_loss(embeddings: Tensor, labels: Tensor, margin: float = 0.2) -> Tensor:
    """FaceNet triplet loss with semi-hard negative mining over the batch.

    Squared Euclidean distances d on L2-normalised embeddings. For every ordered pair (a, p)
    with a != p and the same label, the negative is the closest one farther than p
    (d_an > d_ap, strictly) or, if there is none, the farthest negative. The loss is the mean
    of max(d_ap - d_an + margin, 0) over those pairs; anchors without any negative are skipped
    and a batch without pairs gives a zero that still supports ``backward``.
    Memory is O(B^2): per anchor, negatives are sorted once and each positive's
    semi-hard negative is found by binary search.
    """
    margin = _real(margin, "margin", "triplet loss")
    if margin < 0:
        raise UserError(f"triplet loss: margin must be >= 0, got {margin:g}.", hint="The usual value is 0.2.")
    if embeddings.dim() != 2:
        raise ValueError(f"expected embeddings of shape (B, D), got {tuple(embeddings.shape)}")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"expected labels of shape ({embeddings.shape[0]},), got {tuple(labels.shape)}")
    n = embeddings.shape[0]
    labels = labels.to(embeddings.device)
    with _no_autocast(embeddings.device):
        x = F.normalize(embeddings.float(), dim=1)
        sq = (x * x).sum(1)
        d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (x @ x.T)).clamp_min(0.0)
        same = labels.unsqueeze(1) == labels.unsqueeze(0)
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        negative = ~same
        n_neg = negative.sum(1)
        positive = same & ~eye & (n_neg > 0).unsqueeze(1)

        # Row a: negatives' distances ascending, non-negatives (+inf) last.
        neg_d = torch.where(negative, d.detach(), torch.full_like(d, math.inf))
        sorted_d, order = neg_d.sort(dim=1)
        # Column p: position of the first negative with d_an > d_ap (strict: right=True).
        pos = torch.searchsorted(sorted_d, d.detach().contiguous(), right=True)
        last = (n_neg - 1).clamp_min(0).unsqueeze(1)
        pos = torch.where(pos < n_neg.unsqueeze(1), pos, last)
        d_an = d.gather(1, order.gather(1, pos))

        terms = F.relu(d - d_an + margin)
        count = positive.sum()
        return torch.where(positive, terms, torch.zeros_like(terms)).sum() / count.clamp_min(1)


@register_loss("facenet")
class TripletLoss(Loss):
    """FaceNet (Schroff et al., 2015): semi-hard triplet loss on L2-normalised embeddings,
    P identities x K images per batch. No class weights: ``num_classes`` is ignored."""

    label = "triplet"
    default_embedding_dim = 128
    normalize_embeddings = True
    batch_layout = "pk"

    @classmethod
    def hyper_parameters(cls) -> tuple[HParam, ...]:
        return (HParam("margin", 0.2, "Triplet margin on squared distances", 0.0, 4.0, True),)

    def __init__(self, embedding_dim: int = 128, num_classes: int = 0, **hparams):
        super().__init__()
        for name, value in self.check_hparams(hparams).items():
            setattr(self, name, float(value))

    def loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return semihard_triplet_loss(embeddings.float(), labels, margin=self.margin)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.loss(embeddings, labels)
