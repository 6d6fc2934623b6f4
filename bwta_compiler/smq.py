"""Smooth Multi-Stage Quantization (SMQ): training a model that :func:`bwta_compiler.quantize` produced.

Pieces (paper §2, reconstruction choices in ../shared/paper.md §6):

* :class:`SMQSchedule` — the stages.  *Levelwise* degradation steps the activation quantizers through
  2m+1 levels (ternary) / m+1 levels (bool), m = 8, 7, ..., 1; *bitwise* degradation halves the bit
  width (8 -> 4 -> 2 bits, m = 127 -> 7 -> 1); *direct* trains at m = 1 only.  Weights are binary
  throughout (``BWTALinear`` always binarizes them).
* :func:`switch_stage` — sets the new level count on every :class:`TernaryQuantizer` /
  :class:`BoolQuantizer` and re-initialises its scale on a calibration batch with one of

  - ``"projection"`` (the paper's magnitude-alignment factor):
    ``s <- s * sum|Q_old(x)| / sum|Q_new(x)|`` with both quantizers at the old ``s``;
  - ``"none"`` (keep ``s``), ``"mean"`` (LSQ re-initialisation ``2 mean|x| / sqrt(m)``, bool
    ``4 mean|x| / sqrt(m)``), ``"search"`` (grid search of ``s`` minimising ``||x - Q_new(x)||^2``).

  Quantizers are called through ``.codes(x)`` rather than ``__call__``, so the inputs are captured
  by wrapping ``codes`` on the instance for the duration of the calibration forward (the
  equivalent of a forward pre-hook).
* :class:`FeatureTap` / :func:`distill_loss` — distillation from the float teacher: soft
  cross-entropy on logits, MSE on every block's hidden state, and a squared error on the
  attention probabilities (teacher: recomputed from the float core's inputs; student: the
  probabilities entering the bool quantizer).
* :class:`SMQTrainer` — AdamW + warm-up/cosine schedule, stage switches at the schedule's
  boundaries, checkpoints that resume bit-identically (model, optimizer, LR scheduler, step,
  stage, quantizer levels, RNG states).  Batches come from ``get_batch(step)`` so the data order is
  a function of the step, which is what makes a resumed run identical.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .modules import (
    AttentionCore,
    BinaryActQuantizer,
    BoolQuantizer,
    BWTAAttention,
    TernaryQuantizer,
    apply_attention_mask,
    repeat_kv,
)

SWITCH_METHODS = ("projection", "none", "mean", "search")
# Smallest activation scale the trainer lets an optimiser step leave behind (see SMQTrainer.train_step).
SCALE_FLOOR = 1e-8


# ---- schedule ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One SMQ stage: ternary quantizers use ``levels`` (2m+1 levels), bool ones ``bool_levels``
    ({0..m}), for ``steps`` optimiser steps."""

    levels: int
    bool_levels: int
    steps: int

    def __post_init__(self) -> None:
        ops.check_levels(self.levels, "Stage")
        ops.check_levels(self.bool_levels, "Stage")
        if self.steps < 0:
            raise ValueError(f"Stage: steps must be >= 0, got {self.steps}")

    @property
    def num_levels(self) -> int:
        return 2 * self.levels + 1


@dataclass(frozen=True)
class SMQSchedule:
    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("SMQSchedule needs at least one stage")

    # constructors -------------------------------------------------------------------------------
    @staticmethod
    def levelwise(steps_per_stage: int, final_steps: int | None = None, start: int = 8,
                  end: int = 1) -> SMQSchedule:
        """m = start, start-1, ..., end (17 -> 15 -> ... -> 3 levels by default); the last stage gets
        ``final_steps`` (default ``steps_per_stage``)."""
        if not 1 <= end <= start:
            raise ValueError(f"levelwise: need 1 <= end <= start, got start={start}, end={end}")
        ms = list(range(start, end - 1, -1))
        return SMQSchedule(tuple(Stage(m, m, steps_per_stage if m != end else
                                       (steps_per_stage if final_steps is None else final_steps)) for m in ms))

    @staticmethod
    def bitwise(steps_per_stage: int, final_steps: int | None = None, bits: Sequence[int] = (8, 4, 2)) -> SMQSchedule:
        """Halving bit widths: b bits -> m = 2^(b-1) - 1 (8 -> 127, 4 -> 7, 2 -> 1, i.e. 255 -> 15 -> 3 levels)."""
        ms = [2 ** (b - 1) - 1 for b in bits]
        n = len(ms)
        return SMQSchedule(tuple(Stage(m, m, steps_per_stage if i < n - 1 else
                                       (steps_per_stage if final_steps is None else final_steps))
                                 for i, m in enumerate(ms)))

    @staticmethod
    def direct(steps: int, levels: int = 1) -> SMQSchedule:
        """One stage at the final precision (BWTA trained directly at ternary)."""
        return SMQSchedule((Stage(levels, levels, steps),))

    # queries -------------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    @property
    def boundaries(self) -> list[int]:
        """The step at which each stage starts (the first is 0)."""
        out, acc = [], 0
        for s in self.stages:
            out.append(acc)
            acc += s.steps
        return out

    def stage_index(self, step: int) -> int:
        """Index of the stage that step ``step`` (0-based) trains in; steps past the end stay in the last."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        acc = 0
        for i, s in enumerate(self.stages):
            acc += s.steps
            if step < acc:
                return i
        return len(self.stages) - 1

    def stage(self, step: int) -> Stage:
        return self.stages[self.stage_index(step)]

    def describe(self) -> str:
        return " -> ".join(f"{s.num_levels}L x{s.steps}" for s in self.stages)


# ---- quantizers and stage switches --------------------------------------------------------------


def activation_quantizers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The multi-level activation quantizers SMQ schedules (ternary and bool; the plain-sign
    :class:`BinaryActQuantizer` baseline has no levels and is left alone)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (TernaryQuantizer, BoolQuantizer))]


def _stage_levels(q: nn.Module, stage: Stage) -> int:
    return stage.bool_levels if isinstance(q, BoolQuantizer) else stage.levels


def set_levels(model: nn.Module, stage: Stage) -> None:
    for _, q in activation_quantizers(model):
        q.levels = _stage_levels(q, stage)


def quantizer_levels(model: nn.Module) -> dict[str, int]:
    return {n: int(q.levels) for n, q in activation_quantizers(model)}


@contextlib.contextmanager
def capture_quantizer_inputs(quantizers: Sequence[tuple[str, nn.Module]],
                             max_elems: int = 1 << 22) -> Iterator[dict[str, list[Tensor]]]:
    """Record (detached, fp32) every tensor each quantizer quantizes while the block runs.

    The quantizers are invoked via ``codes(x)``, which bypasses nn.Module hooks, so ``codes`` is
    wrapped on each instance and restored afterwards.  At most ``max_elems`` elements are kept per
    quantizer (later calls are dropped once the budget is used)."""
    seen: dict[str, list[Tensor]] = {n: [] for n, _ in quantizers}
    counts = {n: 0 for n, _ in quantizers}
    for name, q in quantizers:
        orig = q.codes

        def wrapped(x, *a, __orig=orig, __name=name, **kw):
            if counts[__name] < max_elems:
                seen[__name].append(x.detach().float().reshape(-1)[: max_elems - counts[__name]].clone())
                counts[__name] += seen[__name][-1].numel()
            return __orig(x, *a, **kw)

        q.codes = wrapped
    try:
        yield seen
    finally:
        for _, q in quantizers:
            q.__dict__.pop("codes", None)


def _codes(q: nn.Module, x: Tensor, s: Tensor, levels: int) -> Tensor:
    if isinstance(q, BoolQuantizer):
        return ops.bool_code_eager(x, s, q.offset.detach(), levels)
    return ops.ternary_code_eager(x, s, levels)


def projection_factor(q: nn.Module, x: Tensor, old_levels: int, new_levels: int) -> float:
    """``p = sum|Q_old(x)| / sum|Q_new(x)|`` with both quantizers at the current scale (so ``s``
    cancels to a ratio of code magnitudes); 1.0 if the new codes are all zero."""
    s = q.scale.detach()
    num = _codes(q, x, s, old_levels).abs().sum(dtype=torch.float64)
    den = _codes(q, x, s, new_levels).abs().sum(dtype=torch.float64)
    return float(num / den) if den > 0 else 1.0


def _quant_mse(q: nn.Module, x: Tensor, s: Tensor, levels: int) -> float:
    return float(((_codes(q, x, s, levels) * s - x) ** 2).mean())


def search_scale(q: nn.Module, x: Tensor, levels: int, grid: int = 41, span: float = 4.0) -> float:
    """Grid search of the scale minimising ``||x - s * code(x; s)||^2`` over ``s * span^[-1, 1]``
    (log-spaced) around the current scale and the LSQ initialisation."""
    s0 = float(q.scale.detach())
    centres = {s0, float(_mean_init(q, x, levels))}
    best, best_s = math.inf, s0
    for c in centres:
        for f in torch.logspace(-1, 1, grid, base=span).tolist():
            s = torch.tensor(c * f)
            err = _quant_mse(q, x, s, levels)
            if err < best:
                best, best_s = err, float(s)
    return best_s


def _mean_init(q: nn.Module, x: Tensor, levels: int) -> Tensor:
    mult = 4.0 if isinstance(q, BoolQuantizer) else 2.0
    return (mult * x.abs().mean() / math.sqrt(levels)).clamp_min(1e-8)


def switch_stage(model: nn.Module, stage: Stage, calibrate: Callable[[], Any] | None = None,
                 method: str = "projection", max_elems: int = 1 << 20) -> dict[str, dict[str, float]]:
    """Move every activation quantizer to ``stage``'s level count and re-initialise its scale.

    ``calibrate()`` runs one forward pass of ``model`` on a calibration batch (it is called under
    ``torch.no_grad`` with the *old* levels, to capture each quantizer's input).  Returns, per
    quantizer, the old and new levels and scales (and the factor ``p`` for ``"projection"``)."""
    if method not in SWITCH_METHODS:
        raise ValueError(f"unknown switch method {method!r}; expected one of {SWITCH_METHODS}")
    quants = activation_quantizers(model)
    info: dict[str, dict[str, float]] = {}
    seen: dict[str, list[Tensor]] = {}
    if method != "none" and calibrate is not None and quants:
        with torch.no_grad(), capture_quantizer_inputs(quants, max_elems) as seen:
            calibrate()
    for name, q in quants:
        old, new = int(q.levels), _stage_levels(q, stage)
        s_old = float(q.scale.detach())
        rec = {"old_levels": old, "new_levels": new, "old_scale": s_old}
        xs = seen.get(name)
        if xs and old != new and bool(q.initialized):
            x = torch.cat(xs)
            with torch.no_grad():
                if method == "projection":
                    p = projection_factor(q, x, old, new)
                    rec["p"] = p
                    q.scale.mul_(p)
                elif method == "mean":
                    q.scale.copy_(_mean_init(q, x, new))
                elif method == "search":
                    q.scale.fill_(search_scale(q, x, new))
        q.levels = new
        rec["new_scale"] = float(q.scale.detach())
        info[name] = rec
    return info


# ---- distillation -----------------------------------------------------------------------------


def _find_blocks(model: nn.Module) -> list[nn.Module]:
    """Default hidden-state taps: the children of the first ``ModuleList`` named ``layers``/``layer``."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "layer", "h", "blocks"):
            return list(mod)
    return []


def _float_probs(q: Tensor, k: Tensor, v: Tensor, attn_mask=None, is_causal=False, scale=None) -> Tensor:
    rep = q.shape[-3] // k.shape[-3]
    k = repeat_kv(k, rep)
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * sc
    return torch.softmax(apply_attention_mask(scores, attn_mask, is_causal), dim=-1)


class FeatureTap:
    """Context manager recording a model's block outputs (``hidden``) and attention probabilities
    (``attn``) during a forward pass, in module order.

    * hidden: forward hooks on ``blocks`` (default: the children of the model's ``layers`` list);
      a tuple output contributes its first element;
    * attention: float :class:`AttentionCore` — softmax recomputed from the core's inputs;
      :class:`BWTAAttention` — the probabilities entering ``p_quant`` (before the bool quantizer).
    """

    def __init__(self, model: nn.Module, blocks: Sequence[nn.Module] | None = None,
                 hidden: bool = True, attention: bool = True) -> None:
        self.model = model
        self.blocks = list(blocks) if blocks is not None else _find_blocks(model)
        self.want_hidden, self.want_attn = hidden, attention
        self.hidden: list[Tensor] = []
        self.attn: list[Tensor] = []
        self._handles: list = []
        self._wrapped: list[nn.Module] = []

    def __enter__(self) -> FeatureTap:  # noqa: PYI034  (py3.10: no typing.Self)
        self.hidden.clear()
        self.attn.clear()
        if self.want_hidden:
            for b in self.blocks:
                self._handles.append(b.register_forward_hook(
                    lambda m, i, o: self.hidden.append(o[0] if isinstance(o, tuple) else o)))
        if self.want_attn:
            for m in self.model.modules():
                if isinstance(m, BWTAAttention):
                    orig = m.p_quant.codes

                    def wrapped(x, *a, __orig=orig, **kw):
                        self.attn.append(x)
                        return __orig(x, *a, **kw)

                    m.p_quant.codes = wrapped
                    self._wrapped.append(m.p_quant)
                elif isinstance(m, AttentionCore):
                    self._handles.append(m.register_forward_hook(self._core_hook, with_kwargs=True))
        return self

    def _core_hook(self, mod, args, kwargs, out) -> None:
        names = ("q", "k", "v", "attn_mask", "is_causal", "scale")
        call = dict(zip(names, args))
        call.update(kwargs)
        self.attn.append(_float_probs(**call))

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for q in self._wrapped:
            q.__dict__.pop("codes", None)
        self._handles.clear()
        self._wrapped.clear()


@dataclass
class DistillConfig:
    """Weights of the distillation terms (BiT-style defaults: all 1, no hard-label loss).

    ``attention`` uses the per-row squared L2 distance between probability rows, averaged over
    rows (plain element-mean MSE of probabilities is ~1/T^2 small)."""

    logits: float = 1.0
    hidden: float = 1.0
    attention: float = 1.0
    task: float = 0.0
    temperature: float = 1.0


def soft_cross_entropy(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """``-softmax(t/T) . log_softmax(s/T)`` averaged over all leading positions."""
    t = F.softmax(teacher.float() / temperature, dim=-1)
    return -(t * F.log_softmax(student.float() / temperature, dim=-1)).sum(-1).mean()


def distill_loss(s_logits: Tensor, t_logits: Tensor, s_tap: FeatureTap, t_tap: FeatureTap,
                 cfg: DistillConfig, mask: Tensor | None = None) -> dict[str, Tensor]:
    """The distillation terms (unweighted) and their weighted sum under ``"total"``.

    ``mask`` [B, T] (1 = real token) restricts the hidden-state MSE to real tokens."""
    out: dict[str, Tensor] = {}
    zero = s_logits.new_zeros((), dtype=torch.float32)
    out["logits"] = soft_cross_entropy(s_logits, t_logits, cfg.temperature) if cfg.logits else zero
    h = zero
    if cfg.hidden:
        if len(s_tap.hidden) != len(t_tap.hidden):
            raise ValueError(f"distill: student has {len(s_tap.hidden)} hidden taps, teacher {len(t_tap.hidden)}")
        for sh, th in zip(s_tap.hidden, t_tap.hidden):
            d = (sh.float() - th.float()) ** 2
            if mask is not None:
                m = mask[..., None].to(d.dtype)
                h = h + (d * m).sum() / (m.sum() * d.shape[-1]).clamp_min(1)
            else:
                h = h + d.mean()
    out["hidden"] = h
    a = zero
    if cfg.attention:
        if len(s_tap.attn) != len(t_tap.attn):
            raise ValueError(f"distill: student has {len(s_tap.attn)} attention taps, teacher {len(t_tap.attn)}")
        for sa, ta in zip(s_tap.attn, t_tap.attn):
            a = a + ((sa.float() - ta.float()) ** 2).sum(-1).mean()
    out["attention"] = a
    out["total"] = cfg.logits * out["logits"] + cfg.hidden * h + cfg.attention * a
    return out


# ---- optimiser, LR schedule --------------------------------------------------------------------


def cosine_lambda(total: int, warmup: int, floor: float = 0.0) -> Callable[[int], float]:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``floor`` at ``total``."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.01,
                   scale_lr: float | None = None) -> torch.optim.AdamW:
    """AdamW; quantizer scales/offsets, norms and biases get no weight decay (scales may get their own LR)."""
    decay, no_decay, scales = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("scale", "offset"):
            scales.append(p)
        elif p.dim() < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if scales:
        groups.append({"params": scales, "weight_decay": 0.0, "lr": lr if scale_lr is None else scale_lr})
    return torch.optim.AdamW(groups, lr=lr)


# ---- trainer -----------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    lr: float = 2e-4
    scale_lr: float | None = None
    weight_decay: float = 0.01
    warmup: float = 0.1          # fraction of total steps (or an int number of steps if >= 1)
    grad_clip: float = 1.0
    switch: str = "projection"   # stage-switch scale re-initialisation: projection | none | mean | search
    distill: DistillConfig | None = field(default_factory=DistillConfig)


def _rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np
        st["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "numpy" in st:
        import numpy as np
        np.random.set_state(st["numpy"])


class SMQTrainer:
    """Quantization-aware training of ``model`` under an :class:`SMQSchedule`.

    * ``forward(model, batch) -> logits`` runs a model on a batch;
    * ``task_loss(logits, batch) -> loss`` is the hard-label loss (used alone without a teacher,
      or with weight ``distill.task`` next to the distillation terms);
    * ``teacher``: the float model to distil from (frozen, eval mode) or None;
    * ``mask_fn(batch) -> [B, T]`` optionally masks padded tokens in the hidden-state loss;
    * ``calib_batch``: the batch used for stage-switch calibration (default: the batch of the
      step at which the switch happens).

    ``train_step(batch)`` applies a pending stage switch, then one optimiser step; ``fit`` loops
    over ``get_batch(step)`` with periodic evaluation and checkpoints.
    """

    def __init__(self, model: nn.Module, schedule: SMQSchedule, forward: Callable[[nn.Module, Any], Tensor],
                 task_loss: Callable[[Tensor, Any], Tensor], config: TrainConfig | None = None,
                 teacher: nn.Module | None = None, mask_fn: Callable[[Any], Tensor] | None = None,
                 calib_batch: Any = None) -> None:
        self.model, self.schedule, self.forward, self.task_loss = model, schedule, forward, task_loss
        self.config = config or TrainConfig()
        if self.config.switch not in SWITCH_METHODS:
            raise ValueError(f"unknown switch method {self.config.switch!r}; expected one of {SWITCH_METHODS}")
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()  # run under no_grad; its requires_grad flags are left alone (a later
            # quantize(teacher) copy must still be trainable)
        self.mask_fn, self.calib_batch = mask_fn, calib_batch
        self.optimizer = make_optimizer(model, self.config.lr, self.config.weight_decay, self.config.scale_lr)
        total = max(1, schedule.total_steps)
        w = self.config.warmup
        warm = int(w) if w >= 1 else round(w * total)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_lambda(total, warm))
        self.step = 0
        self.stage_idx = 0
        self.history: list[dict[str, float]] = []
        self.switches: list[dict[str, Any]] = []
        set_levels(model, schedule.stages[0])

    # training -----------------------------------------------------------------------------------
    def _maybe_switch(self, batch: Any) -> None:
        idx = self.schedule.stage_index(self.step)
        while self.stage_idx < idx:  # also steps over zero-length stages one at a time
            self.stage_idx += 1
            calib = self.calib_batch if self.calib_batch is not None else batch
            was_training = self.model.training
            self.model.eval()
            info = switch_stage(self.model, self.schedule.stages[self.stage_idx],
                                lambda c=calib: self.forward(self.model, c), self.config.switch)
            self.model.train(was_training)
            self.switches.append({"step": self.step, "stage": self.stage_idx, "quantizers": info})

    def compute_loss(self, batch: Any) -> dict[str, Tensor]:
        d = self.config.distill
        if self.teacher is None or d is None:
            logits = self.forward(self.model, batch)
            loss = self.task_loss(logits, batch)
            return {"total": loss, "task": loss.detach()}
        want_h, want_a = bool(d.hidden), bool(d.attention)
        with FeatureTap(self.model, hidden=want_h, attention=want_a) as s_tap:
            s_logits = self.forward(self.model, batch)
        with torch.no_grad(), FeatureTap(self.teacher, hidden=want_h, attention=want_a) as t_tap:
            t_logits = self.forward(self.teacher, batch)
        mask = self.mask_fn(batch) if self.mask_fn is not None else None
        terms = distill_loss(s_logits, t_logits, s_tap, t_tap, d, mask)
        if d.task:
            terms["task"] = self.task_loss(s_logits, batch)
            terms["total"] = terms["total"] + d.task * terms["task"]
        return terms

    def train_step(self, batch: Any) -> dict[str, float]:
        self._maybe_switch(batch)
        self.model.train()
        terms = self.compute_loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        clamped = self._keep_scales_positive()
        self.lr_scheduler.step()
        rec = {k: float(v.detach()) for k, v in terms.items()}
        if clamped:
            rec["scale_clamps"] = clamped
        rec.update(step=self.step, stage=self.stage_idx, levels=self.schedule.stages[self.stage_idx].num_levels)
        self.history.append(rec)
        self.step += 1
        return rec

    def _keep_scales_positive(self) -> int:
        """Clamp every activation-quantizer scale to ``>= SCALE_FLOOR`` after an optimiser step.

        AdamW moves a parameter by about ``lr`` per step whatever its magnitude, so a scale that is
        small next to the learning rate (e.g. ``s = mean|x| ~ 1e-4`` with ``lr = 5e-4``) can step
        below zero, after which the quantizer ops reject it (``s must be finite and > 0``) and the
        run dies.  Returns how many scales were clamped (recorded in the step's history)."""
        n = 0
        with torch.no_grad():
            for m in self.model.modules():
                if isinstance(m, (TernaryQuantizer, BoolQuantizer, BinaryActQuantizer)):
                    floor = torch.tensor(SCALE_FLOOR, dtype=m.scale.dtype)
                    if not bool(m.scale.isfinite()) or bool(m.scale < floor):
                        m.scale.copy_(floor)
                        n += 1
        return n

    def fit(self, get_batch: Callable[[int], Any], steps: int | None = None,
            eval_fn: Callable[[nn.Module], dict[str, float]] | None = None, eval_every: int = 0,
            checkpoint: str | None = None, checkpoint_every: int = 0,
            log: Callable[[str], None] | None = None) -> list[dict[str, float]]:
        """Train until ``steps`` (default: the schedule's total) is reached, from the current step.
        ``eval_fn(model)`` results are appended to ``self.evals`` with the step."""
        end = self.schedule.total_steps if steps is None else steps
        if not hasattr(self, "evals"):
            self.evals: list[dict[str, float]] = []
        while self.step < end:
            rec = self.train_step(get_batch(self.step))
            if log and (self.step % max(1, end // 20) == 0 or self.step == end):
                log(f"step {self.step}/{end} stage {rec['stage']} ({rec['levels']}L) loss {rec['total']:.4f}")
            if eval_fn and eval_every and (self.step % eval_every == 0 or self.step == end):
                self.model.eval()
                with torch.no_grad():
                    ev = eval_fn(self.model)
                self.evals.append({"step": self.step, **ev})
                if log:
                    log(f"  eval @ {self.step}: {ev}")
            if checkpoint and checkpoint_every and self.step % checkpoint_every == 0:
                self.save(checkpoint)
        return self.history

    # checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "step": self.step,
            "stage_idx": self.stage_idx,
            "levels": quantizer_levels(self.model),
            "schedule": [asdict(s) for s in self.schedule.stages],
            "config": {k: v for k, v in asdict(self.config).items()},
            "history": list(self.history),
            "switches": list(self.switches),
            "evals": list(getattr(self, "evals", [])),
            "rng": _rng_state(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        sched = [asdict(s) for s in self.schedule.stages]
        if sd["schedule"] != sched:
            raise ValueError(f"checkpoint schedule {sd['schedule']} differs from this trainer's {sched}")
        # Levels first: they are plain attributes, not part of the module state.
        for name, q in activation_quantizers(self.model):
            if name in sd["levels"]:
                q.levels = sd["levels"][name]
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.lr_scheduler.load_state_dict(sd["lr_scheduler"])
        self.step, self.stage_idx = sd["step"], sd["stage_idx"]
        self.history, self.switches = list(sd["history"]), list(sd["switches"])
        self.evals = list(sd.get("evals", []))
        _set_rng_state(sd["rng"])

    def save(self, path: str) -> None:
        """Atomic save (write to a temporary file, then rename)."""
        tmp = f"{path}.tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load(self, path: str) -> None:
        self.load_state_dict(torch.load(path, weights_only=False))


__all__ = [
    "SCALE_FLOOR",
    "SWITCH_METHODS",
    "DistillConfig",
    "FeatureTap",
    "SMQSchedule",
    "SMQTrainer",
    "Stage",
    "TrainConfig",
    "activation_quantizers",
    "capture_quantizer_inputs",
    "cosine_lambda",
    "distill_loss",
    "make_optimizer",
    "projection_factor",
    "quantizer_levels",
    "search_scale",
    "set_levels",
    "soft_cross_entropy",
    "switch_stage",
]
