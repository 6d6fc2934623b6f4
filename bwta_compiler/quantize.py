"""``bwta_compiler.quantize``: swap a model's linear layers and attention for BWTA ones.

What is rewritten:

* ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2; weight stored [in, out]) -> :class:`BWTALinear`
  (unless a name pattern keeps it float; by default embeddings, the LM head, classifier/pooler
  heads stay float);
* :class:`AttentionCore` (the example models) -> :class:`BWTAAttention`;
* ``nn.MultiheadAttention`` -> :class:`BWTAMultiheadAttention`;
* Hugging Face transformers attention (``BertSelfAttention``, ``LlamaAttention``, ...): the model's
  attention implementation is switched to a registered ``"bwta"`` function that runs a
  per-module :class:`BWTAAttention`;
* modules whose ``forward`` calls ``F.scaled_dot_product_attention`` or computes attention with
  ``matmul``/``@``/``bmm``/``baddbmm``/``einsum`` around a ``softmax``: those calls are routed to a per-module
  :class:`BWTAAttention` (ternary Q·Kᵀ, float softmax, bool P x ternary V); operands that are
  parameters (or views of them) are weights, not attention operands, and stay float.

What cannot be rewritten stays float and is listed in the returned model's ``bwta_report`` (weights a
module multiplies itself, such as MoE routers and stacked expert weights, included).
The input model is never modified.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import inspect
import re
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .modules import AttentionCore, BWTAAttention, BWTALinear, BWTAMultiheadAttention

Choice = Literal["bwta", "float"]

DEFAULT_FLOAT_PATTERNS = (
    r"(^|\.)(lm_head|classifier|pooler|score|qa_outputs|cls|head|embed\w*)(\.|$)",
)


@dataclass
class QuantConfig:
    """Per-layer choice of BWTA vs float.

    ``rules`` are (regex, choice) pairs matched against the module's qualified name in order;
    the first match wins.  Names matching none of them use ``default``.  The default rules keep
    embeddings, the LM head and classifier/pooler heads float.
    """

    rules: list[tuple[str, Choice]] = field(default_factory=lambda: [(p, "float") for p in DEFAULT_FLOAT_PATTERNS])
    default: Choice = "bwta"
    # Activation quantizer of linear layers: "ternary" (BWTA), "bool" or "binary" (baseline).
    act: str = "ternary"
    # Quantization levels m of the activation quantizers (2m+1 levels; SMQ starts high).
    levels: int = 1
    # Quantize the attention MatMuls (Q·Kᵀ ternary x ternary, P·V bool x ternary).
    attention: bool = True
    # Keep the model's output embeddings (the LM head, whatever its name: Hugging Face's
    # get_output_embeddings(), or a linear layer whose weight is an nn.Embedding's) float unless a
    # rule names it.  Names like Whisper's ``proj_out``, DistilBERT's ``vocab_projector`` or ALBERT's
    # ``predictions.decoder`` match none of the default patterns.
    float_output_embeddings: bool = True

    def choice(self, name: str) -> Choice:
        rule = self.rule_choice(name)
        return self.default if rule is None else rule

    def rule_choice(self, name: str) -> Choice | None:
        """The choice of the first rule matching ``name``; None when no rule matches."""
        for pattern, choice in self.rules:
            if re.search(pattern, name):
                return choice
        return None


@dataclass(frozen=True)
class ReportEntry:
    name: str
    kind: str          # "linear" | "attention"
    choice: str        # "bwta" | "float"
    reason: str = ""


def quantize(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Return a copy of ``model`` with BWTA linear layers and attention (see module docstring)."""
    config = config or QuantConfig()
    model = copy.deepcopy(model)
    if isinstance(model, (nn.Linear, nn.MultiheadAttention, AttentionCore)) or _is_hf_conv1d(model):
        # A bare layer: swap it inside a holder (the loop below swaps children), then unwrap.
        holder = quantize(nn.ModuleDict({"root": model}), config)
        new = holder["root"]
        new.bwta_report = [dataclasses.replace(e, name="") for e in holder.bwta_report]
        return new
    report: list[ReportEntry] = []
    heads = _output_embeddings(model) if config.float_output_embeddings else {}
    direct = _weights_read_directly(model)
    aliases = _aliases(model)
    holders = _parameter_holders(model)
    # Conv1D weights ([in, out]) become one shared [out, in] Parameter per original weight: Conv1D
    # layers tied to each other stay tied (each had got its own transposed copy).
    transposed: dict[int, nn.Parameter] = {}
    # Swapped after the walk, at every name the module is registered under: a module held by two
    # parents (or twice by one) was swapped at its first name only and ran float at the others.
    swapped: dict[int, nn.Module] = {}
    for name, mod in list(model.named_modules()):
        if not name:
            report.extend(_own_entries("<root>", mod, config.choice(name)))   # the root is never swapped
            continue
        choice = config.choice(name)
        also = f" (also registered as {', '.join(aliases[id(mod)])})" if id(mod) in aliases else ""
        if (isinstance(mod, nn.Linear) and not isinstance(mod, nn.modules.linear.NonDynamicallyQuantizableLinear)) \
                or _is_hf_conv1d(mod):
            choice, why = _linear_choice(config, name, mod, heads, direct)
            if choice == "bwta" and (own := _own_forward(mod)):
                choice, why = "float", own
            if choice == "bwta" and _is_hf_conv1d(mod):
                choice, why = _conv1d_tie_choice(name, mod, holders, config, heads, direct)
            if choice == "bwta":
                # The Parameters themselves, not copies: weights tied elsewhere stay tied.
                swapped[id(mod)] = _linear_from_conv1d(mod, config, transposed) if _is_hf_conv1d(mod) else \
                    BWTALinear.from_linear(mod, config.act, config.levels, share_parameters=True)
            report.append(ReportEntry(name, "linear", choice, (why + also).strip()))
        elif isinstance(mod, AttentionCore):
            if choice == "bwta" and config.attention:
                swapped[id(mod)] = BWTAAttention(config.levels).to(_device_of(model))
            report.append(ReportEntry(name, "attention", choice if config.attention else "float", also.strip()))
        elif isinstance(mod, nn.MultiheadAttention):
            entry, new = _swap_mha(name, mod, choice, config)
            if new is not None:
                swapped[id(mod)] = new
            report.append(dataclasses.replace(entry, reason=(entry.reason + also).strip()))
        else:
            report.extend(_own_entries(name, mod, choice))
    _swap_everywhere(model, swapped)
    report.extend(_patch_hf_attention(model, config))
    report.extend(_patch_sdpa_callers(model, config))
    _disable_torch_fast_paths(model)
    model.bwta_report = report
    return model


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _disable_torch_fast_paths(model: nn.Module) -> None:
    """nn.TransformerEncoderLayer / nn.TransformerEncoder have a fused float inference fast path that
    reads ``linear1.weight`` etc. directly (and nested tensors for padding masks): it would skip the
    BWTA layers, so it is turned off where a layer holds any.

    A float nn.MultiheadAttention (kept float by a rule, or a subclass with its own forward) in a model
    with BWTA layers runs its eager fast path (``torch._native_multi_head_attention``) while a
    compiled graph runs the decomposed one: float results an ulp apart that the next BWTA quantizer
    turns into different codes, so the compiled model was not bitwise the eager one.  Its eager calls
    now take the decomposed path too.  The same holds for float nn.TransformerEncoder(Layer)s in such a
    model: a float encoder with a padding mask returned zeros at padded positions eagerly (nested
    tensors) and other values compiled."""
    bwta_types = (BWTALinear, BWTAMultiheadAttention, BWTAAttention)
    if not any(isinstance(m, bwta_types) for m in model.modules()):
        return
    for mod in model.modules():
        # Float ones too (kept float by a rule): their eager fast path (nested tensors: zeros at padded
        # positions; the fused layer op) is not what a compiled graph runs, and their output feeds
        # BWTA layers.
        if isinstance(mod, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
            if isinstance(mod, nn.TransformerEncoder):
                mod.use_nested_tensor = False
            else:
                mod.activation_relu_or_gelu = 0      # only read by the fast-path check
        if isinstance(mod, nn.MultiheadAttention) and "forward" not in mod.__dict__:
            mod.forward = _BoundForward(mod, _mha_without_fast_path)


class _BoundForward:
    """``fn`` bound to ``module`` as its instance ``forward``.  Unlike a closure over the module, a deep
    copy calls the copy's own modules; unlike a ``types.MethodType`` of a function the class does not
    have, it pickles (``torch.save(model)``) and loads."""

    def __init__(self, module: nn.Module, fn) -> None:
        self.module, self.fn = module, fn

    def __call__(self, *args, **kwargs):
        return self.fn(self.module, *args, **kwargs)


def _mha_without_fast_path(self, *args, **kwargs):
    """nn.MultiheadAttention's forward with torch's MHA fast path off for eager calls (a compiled
    graph never takes it); bound to the module, so a deep copy calls its own."""
    if torch.compiler.is_compiling() or not torch.backends.mha.get_fastpath_enabled():
        return type(self).forward(self, *args, **kwargs)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def _is_hf_conv1d(mod: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2, OpenAI GPT): a linear layer whose weight is stored [in, out].
    cls = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return cls is not None and isinstance(mod, cls) and mod.weight.dim() == 2


def _linear_from_conv1d(mod: nn.Module, config: QuantConfig, transposed: dict[int, nn.Parameter]) -> BWTALinear:
    """A BWTALinear for a Conv1D: its weight is the transposed ([out, in]) copy of the Conv1D's weight,
    one Parameter per original (``transposed``, by id), so Conv1D layers tied to each other share it;
    the bias is the Conv1D's own Parameter."""
    w = mod.weight                                   # [in, out]
    new = BWTALinear(w.shape[0], w.shape[1], mod.bias is not None, config.act, config.levels,
                     device=w.device, dtype=w.dtype)
    if id(w) not in transposed:
        transposed[id(w)] = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
    new.weight = transposed[id(w)]
    if mod.bias is not None:
        new.bias = mod.bias
    return new


def _parameter_holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """id(Parameter) -> the (name, module) pairs holding it as one of their own parameters."""
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, mod in model.named_modules():
        for p in mod._parameters.values():
            if p is not None:
                holders.setdefault(id(p), []).append((name, mod))
    return holders


def _conv1d_tie_choice(name: str, mod: nn.Module, holders: dict[int, list[tuple[str, nn.Module]]],
                       config: QuantConfig, heads: dict[int, str], direct: dict[int, str]) -> tuple[Choice, str]:
    """A Conv1D's BWTA weight is a transposed copy: that keeps a tie only to other Conv1D layers swapped
    with it.  A weight also held by anything else (an nn.Linear, a float layer, a module multiplying it
    itself) would be untied, so such a Conv1D stays float and says why."""
    for other_name, other in holders.get(id(mod.weight), []):
        if other is mod:
            continue
        if _is_hf_conv1d(other) and other.weight is mod.weight and \
                _linear_choice(config, other_name, other, heads, direct)[0] == "bwta":
            continue
        return "float", (f"weight [in, out] {list(mod.weight.shape)} tied to {other_name or '<root>'} "
                         f"({type(other).__name__}), which does not become a BWTA Conv1D with it: a BWTA copy "
                         "([out, in]) would untie them, so it stays float")
    return "bwta", ""


def _own_forward(mod: nn.Module) -> str:
    """The reason a subclass of nn.Linear / Conv1D / nn.MultiheadAttention that overrides ``forward``
    (a LoRA layer adding ``B(A(x))``, a subclass adding a bias to ``attn_mask``) is not swapped: the
    BWTA module put in its place would run instead of that forward and silently drop what it adds
    (and the report listed its submodules as BWTA layers that never ran).  A linear subclass whose
    forward computes the plain linear layer (Falcon's ``FalconLinear``: ``x @ self.weight.T + bias``)
    is swapped: its forward is checked on a random input.  "" when the module can be swapped."""
    if isinstance(mod, nn.MultiheadAttention):
        base = nn.MultiheadAttention
    elif isinstance(mod, nn.Linear):
        base = nn.Linear
    else:
        base = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    if base is None or getattr(type(mod), "forward", None) is getattr(base, "forward", None):
        return ""
    why = f"{type(mod).__name__} subclasses {base.__name__} with its own forward"
    if base is nn.MultiheadAttention:
        return why + ": a BWTA module in its place would not run that forward, so it stays float"
    if _computes_plain_linear(mod):
        return ""
    return why + (", which does not compute the plain linear layer (checked on a random input): a BWTA "
                  "module in its place would not run that forward, so it stays float")


def _computes_plain_linear(mod: nn.Module) -> bool:
    """Whether a linear subclass's own forward gives ``x @ W^T + b`` on a random input (a generator of
    its own: the caller's random stream is untouched; hooks are not run)."""
    w = mod.weight
    w = w.t() if not isinstance(mod, nn.Linear) else w          # Conv1D stores [in, out]
    if w.device.type == "meta" or w.dim() != 2:
        # Nothing to run: swap it only when it holds nothing but its weight and bias.
        return not list(mod.children()) and {n for n, _ in mod.named_parameters()} <= {"weight", "bias"} \
            and not list(mod.buffers())
    try:
        gen = torch.Generator(device=w.device).manual_seed(0)
        x = torch.randn(3, w.shape[1], generator=gen, device=w.device, dtype=torch.float32).to(w.dtype)
        with torch.no_grad():
            out = type(mod).forward(mod, x)
            ref = F.linear(x, w, mod.bias)
        if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
            return False
        tol = 1e-2 if w.dtype in (torch.float16, torch.bfloat16) else 1e-4
        return bool(torch.allclose(out.float(), ref.float(), rtol=tol, atol=tol))
    except Exception:  # noqa: BLE001 -- user code: needs other arguments, another input shape...
        return False


def _swap_mha(name: str, mod: nn.MultiheadAttention, choice: Choice,
              config: QuantConfig) -> tuple[ReportEntry, nn.Module | None]:
    if choice != "bwta":
        return ReportEntry(name, "attention", "float", "kept float by rule"), None
    if own := _own_forward(mod):
        return ReportEntry(name, "attention", "float", own + " (its projections and attention too)"), None
    try:
        new = BWTAMultiheadAttention(mod, config.act)
    except NotImplementedError as e:
        return ReportEntry(name, "attention", "float", str(e)), None
    return ReportEntry(name, "attention", "bwta"), new


def _swap_everywhere(model: nn.Module, swapped: dict[int, nn.Module]) -> None:
    """Put each new module in place of the old one under every parent and attribute holding it."""
    if not swapped:
        return
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in swapped:
                setattr(parent, child_name, swapped[id(child)])


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """id -> the names after the first of modules registered under more than one name."""
    names: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if name:
            names.setdefault(id(mod), []).append(name)
    return {k: v[1:] for k, v in names.items() if len(v) > 1}


def _linear_choice(config: QuantConfig, name: str, mod: nn.Module, heads: dict[int, str],
                   direct: dict[int, str]) -> tuple[Choice, str]:
    """(choice, reason) for a linear layer: its weight passed to a MatMul by another module (the
    layer itself never runs) stays float; an unnamed LM head stays float unless a rule names it."""
    if id(mod) in direct:
        return "float", direct[id(mod)]
    rule = config.rule_choice(name)
    if rule is None and id(mod) in heads:
        return "float", f"{heads[id(mod)]}: kept float by default (float_output_embeddings; a rule naming it quantizes it)"
    choice = config.default if rule is None else rule
    return choice, "" if choice == "bwta" else "kept float by rule"


def _output_embeddings(model: nn.Module) -> dict[int, str]:
    """id -> description of the model's output embeddings (LM head): what Hugging Face's
    ``get_output_embeddings()`` returns, and linear layers whose weight is an nn.Embedding's."""
    heads: dict[int, str] = {}
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            out = get()
        except (NotImplementedError, AttributeError, TypeError):   # models without such a head raise
            out = None
        if isinstance(out, nn.Module):
            heads[id(out)] = "the model's output embeddings (LM head, get_output_embeddings())"
    embeddings = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, nn.Linear) and id(w) in embeddings:
            heads.setdefault(id(mod), f"LM head: weight tied to embedding {embeddings[id(w)]}")
    return heads


# Functions that multiply by weights passed to them besides the MatMul calls.
_WEIGHT_TAKING_CALLS = ("multi_head_attention_forward",)


def _weights_read_directly(model: nn.Module) -> dict[int, str]:
    """id -> reason, for linear layers whose weight another module's forward passes to a MatMul
    itself (``F.linear(x, self.out.weight)``, ``F.multi_head_attention_forward(..., self.out.weight,
    ...)``): swapping such a layer would change nothing that runs, while the report said BWTA."""
    found: dict[int, str] = {}
    for name, mod in model.named_modules():
        parsed = _forward_ast(mod) if ".weight" in _forward_source(mod) else None
        if parsed is None:
            continue
        tree, this = parsed
        for node in ast.walk(tree):
            for operand in _matmul_operands(node):
                chain = _attribute_chain(operand, this)
                if chain is None or len(chain) < 2 or chain[-1] != "weight":
                    continue
                try:
                    owner = mod.get_submodule(".".join(chain[:-1]))
                except AttributeError:
                    continue
                if isinstance(owner, nn.Linear) or _is_hf_conv1d(owner):
                    call = ast.unparse(node.func) if isinstance(node, ast.Call) else "@"
                    found.setdefault(id(owner), f"{name or '<root>'} passes its weight to {call}() itself "
                                                "(the layer is never called, so a BWTA swap would not run)")
    return found


def _attribute_chain(node: ast.AST, this: str) -> list[str] | None:
    """``self.a.b.weight`` -> ["a", "b", "weight"]; None for anything else."""
    chain = []
    while isinstance(node, ast.Attribute):
        chain.append(node.attr)
        node = node.value
    return chain[::-1] if isinstance(node, ast.Name) and node.id == this and chain else None


def _own_entries(name: str, mod: nn.Module, choice: Choice) -> list[ReportEntry]:
    """Entries for a module's own weights multiplied in its forward, and for attention it leaves to
    F.multi_head_attention_forward (float: only nn.MultiheadAttention is swapped)."""
    entries = []
    if weights := _self_multiplied_weights(mod):
        entries.append(_own_weights_entry(name, mod, weights, choice))
    if "multi_head_attention_forward" in _forward_source(mod):
        entries.append(ReportEntry(name, "attention", "float", f"{type(mod).__name__} calls "
                                   "F.multi_head_attention_forward itself: its projections and attention run "
                                   "in float (nn.MultiheadAttention is swapped for BWTA)"))
    return entries


# ---- Hugging Face transformers ---------------------------------------------------------------


def _bwta_hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface function: [B, H, T, D] in, [B, T, H, D] out."""
    unsupported = [k for k in _HF_FLOAT_ONLY_KWARGS if kwargs.get(k) is not None]
    if unsupported:
        return _hf_float_attention(module, query, key, value, attention_mask, scaling, dropout, unsupported, **kwargs)
    core: BWTAAttention = module.bwta_core
    mask = attention_mask
    if mask is not None and mask.dim() == 4:
        mask = mask[:, :, :, : key.shape[-2]]
    bias = kwargs.get("position_bias")        # T5-style relative position bias, added to the scores
    if bias is not None:
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=bias.dtype, device=mask.device).masked_fill(~mask, float("-inf"))
        bias = bias[..., : key.shape[-2]]
        mask = bias if mask is None else bias + mask
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", False) if causal is None else causal
    is_causal = attention_mask is None and bool(causal) and query.shape[-2] > 1
    weights = None
    if kwargs.get("output_attentions") and isinstance(core, BWTAAttention):
        # The model returns these as ``outputs.attentions``: the quantized probabilities P·V used
        # (returning None gave an empty tuple without a word).
        out, weights = core.attend(query, key, value, mask, is_causal, scaling, need_weights=True)
    else:
        out = core(query, key, value, attn_mask=mask, is_causal=is_causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), weights


# Attention-interface arguments the BWTA core does not implement (logit soft-capping, attention
# sinks): such calls run the model's own float attention instead of a wrong low-bit one.
_HF_FLOAT_ONLY_KWARGS = ("softcap", "s_aux", "sinks")


def _hf_float_attention(module, query, key, value, attention_mask, scaling, dropout, unsupported, **kwargs):
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if not getattr(module, "_bwta_float_warned", False):
        module._bwta_float_warned = True
        warnings.warn(f"bwta: {type(module).__name__} passes {', '.join(unsupported)} to attention, which BWTA "
                      "attention does not implement; this attention runs in float", stacklevel=3)
    if eager is None:
        raise NotImplementedError(f"bwta: {type(module).__name__} attention with {', '.join(unsupported)} "
                                  "has no float eager_attention_forward to fall back to")
    return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


@functools.lru_cache(maxsize=1)
def _register_hf_attention() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    except Exception:  # transformers missing or too old: nothing to patch
        return False
    AttentionInterface.register("bwta", _bwta_hf_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("bwta", eager_mask)
    return True


def _is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "_attn_implementation") and hasattr(model, "set_attn_implementation")


def _patch_hf_attention(model: nn.Module, config: QuantConfig) -> list[ReportEntry]:
    if not _is_hf_model(model):
        return []
    entries = []
    leaves = [(n, m) for n, m in model.named_modules()
              if type(m).__name__.endswith(("SelfAttention", "Attention"))
              and not isinstance(m, (BWTAAttention, BWTAMultiheadAttention, AttentionCore, nn.MultiheadAttention))
              and not any(isinstance(c, nn.Module) and type(c).__name__.endswith("SelfAttention") for c in m.children())]
    # Modules without a config cannot read the attention implementation (Bloom's and MPT's ALiBi
    # attention, DeBERTa-v2's disentangled attention, MPNet's relative-position attention): they
    # compute attention themselves.  One plain attention (one Q·Kᵀ product, one softmax, one P·V
    # product) has its MatMuls redirected to BWTA; anything more stays float.
    own = [_own_attention_entry(model, n, m, config)
           for n, m in leaves if not hasattr(m, "config") and _computes_attention(m)]
    attn_modules = [(n, m) for n, m in leaves if hasattr(m, "config")]
    if not attn_modules:
        return own
    # Attention arguments BWTA attention does not implement, known from the config: such layers run
    # the model's own float attention (the run-time check in _bwta_hf_attention says so too).
    float_kwargs = ["softcap"] if getattr(model.config, "attn_logit_softcapping", None) else []
    if not config.attention or not _register_hf_attention():
        return own + [ReportEntry(n, "attention", "float", "attention quantization off or transformers too old")
                      for n, _ in attn_modules]
    for name, mod in attn_modules:
        unsupported = float_kwargs + (["sinks"] if isinstance(getattr(mod, "sinks", None), torch.Tensor) else [])
        if config.choice(name) != "bwta":
            entries.append(ReportEntry(name, "attention", "float", "kept float by rule"))
        elif unsupported:
            why = f"passes {', '.join(unsupported)} to attention, which BWTA attention does not implement"
            entries.append(ReportEntry(name, "attention", "float", why))
            warnings.warn(f"bwta: {name} ({type(mod).__name__}) {why}; this attention runs in float", stacklevel=3)
        else:
            mod.bwta_core = BWTAAttention(config.levels).to(_device_of(model))
            entries.append(ReportEntry(name, "attention", "bwta"))
    if any(e.choice == "bwta" for e in entries):
        can_set = getattr(type(model), "_can_set_attn_implementation", None)
        if not callable(can_set) or can_set():      # (asking a model that cannot logs a warning)
            model.set_attn_implementation("bwta")
        if model.config._attn_implementation != "bwta":
            # The model computes attention itself, behind its own ``if _attn_implementation == "sdpa"``
            # (Falcon): each layer computing one plain attention on every path has its MatMuls / its
            # F.scaled_dot_product_attention call redirected to BWTA, as for modules without a config.
            why = f"{type(model).__name__} does not use transformers' AttentionInterface"
            for _, mod in attn_modules:
                if hasattr(mod, "bwta_core"):
                    del mod.bwta_core
            return own + [_own_attention_entry(model, n, m, config, why) if e.choice == "bwta" else e
                          for (n, m), e in zip(attn_modules, entries)]
        for name, mod in attn_modules:
            if not hasattr(mod, "bwta_core"):
                # Kept-float layers run the same function with a float core.
                mod.bwta_core = _FloatCore()
    return own + entries


def _own_attention_entry(model: nn.Module, name: str, mod: nn.Module, config: QuantConfig,
                         why: str = "") -> ReportEntry:
    """Redirect a Hugging Face module's self-computed attention to BWTA when it is one plain attention."""
    why = why or f"{type(mod).__name__} computes attention itself (not through transformers' AttentionInterface)"
    if not _single_attention(mod):
        return ReportEntry(name, "attention", "float", why + "; its forward is not one plain attention on every "
                           "path (one Q·Kᵀ product, one softmax, one P·V product, or one "
                           "F.scaled_dot_product_attention call), so it stays float")
    if not config.attention or config.choice(name) != "bwta":
        return ReportEntry(name, "attention", "float", "kept float by rule")
    _redirect(model, mod, config)
    return ReportEntry(name, "attention", "bwta", why + "; its attention is redirected to BWTA attention")


class _FloatCore(AttentionCore):
    """Float attention behind the bwta attention interface, for layers a rule kept float."""


# ---- plain modules that call F.scaled_dot_product_attention ----------------------------------


def _forward_source(mod: nn.Module) -> str:
    """Code of a user module's forward, without docstrings and comments ("" for bwta's own
    modules, torch's built-in modules, or no source)."""
    fwd = type(mod).forward
    if (fwd is nn.Module.forward or isinstance(mod, (AttentionCore, BWTAAttention, BWTAMultiheadAttention))
            or type(mod).__module__.startswith("torch.")):
        # torch's own modules (nn.Transformer, ...) mention softmax/matmul in docstrings only; their
        # attention is nn.MultiheadAttention, swapped separately.
        return ""
    return _code_without_docstrings(fwd)


@functools.lru_cache(maxsize=512)
def _code_without_docstrings(fn) -> str:
    # Per function, not per module: a 12-layer model has 12 instances of each layer class, and
    # reading + parsing the source was ~0.6 s of quantize() on a BERT-base-sized model.
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return ""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            body[0] = ast.Pass()
    return ast.unparse(tree)


def _forward_ast(mod: nn.Module) -> tuple[ast.Module, str] | None:
    """(parsed forward without docstrings, the name it gives the module: "self" or another) of a
    user module, or None (see :func:`_forward_source`)."""
    return _parsed_function(type(mod).forward) if _forward_source(mod) else None


@functools.lru_cache(maxsize=512)
def _parsed_function(fn) -> tuple[ast.Module, str] | None:
    # Cached per function like its source; callers only read the tree.
    tree = ast.parse(_code_without_docstrings(fn))
    node = _function_node(tree)
    return (tree, node.args.args[0].arg) if node is not None and node.args.args else None


def _function_node(tree: ast.AST) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    """The (first) function definition in ``tree``: the parsed function itself."""
    return next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)


def _module_attribute(node: ast.AST, this: str) -> str:
    """``name`` when ``node`` is ``<this>.name`` (an attribute of the module, ``this`` being the
    name its method gives it), else ""."""
    is_own = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == this
    return node.attr if is_own else ""


# Calls that multiply by a weight when given one: F.linear, torch.matmul / Tensor.matmul, mm, bmm,
# einsum, and grouped MatMuls (transformers' MoE experts), with or without a leading underscore.
_WEIGHT_MATMUL_CALLS = ("linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "grouped_mm",
                        *_WEIGHT_TAKING_CALLS)


def _matmul_operands(node: ast.AST) -> list[ast.AST]:
    """Operand expressions of a MatMul written in ``node`` (``a @ b``, ``F.linear(x, w)``,
    ``x.matmul(w)``, ``torch.einsum(eq, a, b)``); [] if it is none."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
        return [node.left, node.right]
    if not isinstance(node, ast.Call):
        return []
    f = node.func
    fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
    if fname.lstrip("_") not in _WEIGHT_MATMUL_CALLS:
        return []
    receiver = [f.value] if isinstance(f, ast.Attribute) else []
    return [*node.args, *(k.value for k in node.keywords), *receiver]


def _self_multiplied_weights(mod: nn.Module) -> list[str]:
    """Names of the module's own (>= 2-d, float) parameters that its forward multiplies itself
    (``F.linear(x, self.weight)`` in a MoE router, ``linear(x, self.gate_up_proj[e])`` in stacked
    MoE experts, ``x @ self.w.T``): weights that are not an ``nn.Linear``, which quantize() cannot
    swap, so they stay float and must say so in the report."""
    params = {n: p for n, p in mod.named_parameters(recurse=False) if p.dim() >= 2 and p.is_floating_point()}
    parsed = _forward_ast(mod) if params else None
    if parsed is None:
        return []
    tree, this = parsed
    used = {_module_attribute(sub, this) for node in ast.walk(tree) for operand in _matmul_operands(node)
            for sub in ast.walk(operand)}
    return sorted(n for n in params if n in used)


def _own_weights_entry(name: str, mod: nn.Module, weights: list[str], choice: Choice) -> ReportEntry:
    shapes = ", ".join(f"{w} {list(getattr(mod, w).shape)}" for w in weights)
    if choice != "bwta":
        return ReportEntry(name, "linear", "float", "kept float by rule")
    return ReportEntry(name, "linear", "float", f"{type(mod).__name__} multiplies its own weights ({shapes}) "
                       "instead of calling an nn.Linear (e.g. a router or stacked MoE experts): they stay float")


def _calls_sdpa(mod: nn.Module) -> bool:
    return "scaled_dot_product_attention" in _forward_source(mod)


def _sdpa_args(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return query, key, value, attn_mask, is_causal, scale


_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm)
_SOFTMAXES = (torch.softmax, F.softmax, torch.Tensor.softmax, torch.nn.functional.softmax)
# Bloom-style ``beta * alibi + alpha * Q·Kᵀ`` in one call.
_BADDBMMS = (torch.baddbmm, torch.Tensor.baddbmm)


def _baddbmm_args(input, batch1, batch2, *, beta=1, alpha=1):
    return input, batch1, batch2, beta, alpha


def _computes_attention(mod: nn.Module) -> bool:
    """A forward that multiplies activations around a softmax (hand-written attention), itself or in a
    method of its own it calls (``self._attn(q, k, v)``: GPT-Neo, OpenAI GPT)."""
    def attention_like(code: str) -> bool:
        return "softmax" in code and any(tok in code for tok in ("matmul", "@", "bmm", "einsum"))

    src = _forward_source(mod)
    if attention_like(src):
        return True
    parsed = _forward_ast(mod) if src else None
    return parsed is not None and any(attention_like(_code_without_docstrings(getattr(type(mod), name)))
                                      for name in _helper_counts(mod, *parsed))


def _is_weight(t: torch.Tensor) -> bool:
    """A parameter or a view of one (``self.w.T``, ``self.w.t()``): a weight, not an activation."""
    return isinstance(t, nn.Parameter) or isinstance(getattr(t, "_base", None), nn.Parameter)


def _einsum_operands(args: tuple) -> tuple[str, tuple] | None:
    """(equation, operands) of ``torch.einsum(eq, a, b)`` or ``torch.einsum(eq, [a, b])``."""
    if not args or not isinstance(args[0], str):
        return None
    ops = tuple(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else tuple(args[1:])
    return args[0], ops


class _AttentionRedirect(torch.overrides.TorchFunctionMode):
    """Inside one module's forward: quantize hand-written attention MatMuls to BWTA.

    Q·Kᵀ (an activation x activation MatMul before a softmax) runs on ternary codes times
    ``s_q * s_k``; the softmax stays float; P·V (the next activation MatMul after it) runs on
    bool(P) x ternary(V) codes times ``s_p * s_v``.  Scaling and masking written by the user
    between them are untouched.  F.scaled_dot_product_attention calls go to the BWTA core.
    """

    def __init__(self, core: BWTAAttention) -> None:
        super().__init__()
        self.core = core
        self.after_softmax = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.core(*_sdpa_args(*args, **kwargs))
        if func in _SOFTMAXES:
            self.after_softmax = True
            return func(*args, **kwargs)
        if func in _MATMULS and len(args) == 2 and not kwargs and _activations(args):
            if not self.after_softmax and args[0].shape[-1] == 1:
                # An outer product (rotary frequencies ``inv_freq @ positions``), not Q·Kᵀ.
                return func(*args, **kwargs)
            return self._quantized(torch.matmul, *args)
        if func in _BADDBMMS and "out" not in kwargs and not self.after_softmax:
            bias, a, b, beta, alpha = _baddbmm_args(*args, **kwargs)
            if _activations((a, b)):
                scores = self._quantized(torch.matmul, a, b) * alpha
                return scores if beta == 0 else (scores + beta * bias).to(bias.dtype)
        if func is torch.einsum and not kwargs:
            # Swin / many vision models: einsum("bhqd,bhkd->bhqk", q, k), einsum("bhqk,bhkd->bhqd", p, v).
            eq_ops = _einsum_operands(args)
            if eq_ops is not None and len(eq_ops[1]) == 2 and _activations(eq_ops[1]):
                eq, (a, b) = eq_ops
                return self._quantized(functools.partial(torch.einsum, eq), a, b)
        return func(*args, **kwargs)

    def _quantized(self, mm, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``mm(a, b)`` on codes times the scales: P·V right after a softmax, else Q·Kᵀ."""
        core = self.core
        if self.after_softmax:
            self.after_softmax = False
            cp, sp = core.p_quant.codes(a)
            cv, sv = core.v_quant.codes(b)
            return (mm(cp.float(), cv.float()) * (sp.float() * sv.float())).to(b.dtype)
        cq, sq = core.q_quant.codes(a)
        ck, sk = core.k_quant.codes(b)
        return (mm(cq.float(), ck.float()) * (sq.float() * sk.float())).to(a.dtype)


def _activations(operands: tuple) -> bool:
    """Both operands are float activations of rank >= 2: not weights (a projection written
    ``x @ self.w.T`` is not Q·Kᵀ, and quantizing it with the attention's quantizers would both
    binarize the weight on the wrong scale and calibrate Q·Kᵀ's scales on the projection)."""
    return all(isinstance(a, torch.Tensor) and a.dim() >= 2 and a.is_floating_point() and not _is_weight(a)
               for a in operands)


def _redirect(model: nn.Module, mod: nn.Module, config: QuantConfig) -> None:
    """Give ``mod`` a BWTA core and run its forward under :class:`_AttentionRedirect`.

    The new forward is bound to ``mod`` (:class:`_BoundForward`; a forward ``mod`` already had of its
    own is kept as an attribute), not a closure over ``mod``: a deep copy of the model kept running the
    original module (its core, its projections) for the copy, and the model could not be pickled."""
    mod.bwta_core = BWTAAttention(config.levels).to(_device_of(model))
    if "forward" in mod.__dict__:
        mod._bwta_inner_forward = mod.__dict__["forward"]
    mod.forward = _BoundForward(mod, _redirected_forward)


def _redirected_forward(self, *args, **kwargs):
    inner = self.__dict__.get("_bwta_inner_forward")
    with _AttentionRedirect(self.bwta_core):
        return inner(*args, **kwargs) if inner is not None else type(self).forward(self, *args, **kwargs)


_SCORE_PRODUCTS = ("matmul", "bmm", "baddbmm", "einsum")


def _products(tree: ast.AST) -> int:
    """Activation products written in ``tree``: ``a @ b``, ``matmul``/``bmm``/``baddbmm``/``einsum`` calls."""
    def is_product(n: ast.AST) -> bool:
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.MatMult):
            return True
        f = getattr(n, "func", None) if isinstance(n, ast.Call) else None
        return (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")) in _SCORE_PRODUCTS

    return sum(is_product(n) for n in ast.walk(tree))


def _single_attention(mod: nn.Module) -> bool:
    """``forward`` computes exactly one attention on every path through it: two products around one
    softmax, or one F.scaled_dot_product_attention call (Falcon has four spellings of its attention
    behind ``if alibi`` / ``if sdpa`` branches, one of which runs).  A method of its own that it calls
    (``self._attn(q, k, v, mask)`` in GPT-Neo and OpenAI GPT) counts with what it computes, so
    DeBERTa's disentangled c2p / p2c scores (which would each be taken for Q·Kᵀ and share its
    quantizers) are more than one attention."""
    parsed = _forward_ast(mod)
    if parsed is None:
        return False
    tree, this = parsed
    fn = _function_node(tree)
    paths = _attention_paths(fn.body, _helper_counts(mod, tree, this), this) if fn is not None else None
    return bool(paths) and paths <= {(0, 0, 0), (2, 1, 0), (0, 0, 1)} and paths != {(0, 0, 0)}


_UNKNOWN = (100, 100, 100)      # counts of a helper that cannot be told: never one attention


def _helper_counts(mod: nn.Module, tree: ast.AST, this: str) -> dict[str, tuple[int, int, int]]:
    """Attention counts of the module's own methods its forward calls (``self._attn(...)``): the
    counts of their one path, or :data:`_UNKNOWN` (several paths, or its source unreadable)."""
    counts: dict[str, tuple[int, int, int]] = {}
    for node in ast.walk(tree):
        attr = _module_attribute(node.func, this) if isinstance(node, ast.Call) else ""
        method = getattr(type(mod), attr, None) if attr else None
        if not attr or attr in counts or attr == "forward" or not inspect.isfunction(method):
            continue
        parsed = _parsed_function(method)
        fn = _function_node(parsed[0]) if parsed is not None else None
        paths = _attention_paths(fn.body, {}, "") if fn is not None else None
        counts[attr] = next(iter(paths)) if paths is not None and len(paths) == 1 else _UNKNOWN
    return counts


def _attention_counts(node: ast.AST, helpers: dict | None = None, this: str = "") -> tuple[int, int, int]:
    """(score products, softmax calls, F.scaled_dot_product_attention calls) written in ``node``, with
    those of the module's own methods it calls (``helpers``, by name)."""
    def name(n: ast.AST) -> str:
        f = n.func if isinstance(n, ast.Call) else None
        return f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")

    calls = [n for n in ast.walk(node) if isinstance(n, ast.Call)]
    names = [name(n) for n in calls]
    total = (_products(node), names.count("softmax"), names.count("scaled_dot_product_attention"))
    for n in calls:
        attr = _module_attribute(n.func, this) if helpers else ""
        if attr and attr in helpers:
            total = _add(total, helpers[attr])
    return total


_MAX_PATHS = 256


def _attention_paths(stmts: list[ast.stmt], helpers: dict | None = None,
                     this: str = "self") -> set[tuple[int, int, int]] | None:
    """The attention counts (:func:`_attention_counts`) of every path through ``stmts`` that does not
    raise: ``if``/``else`` branches are separate paths, a ``return`` ends one.  None when it cannot tell
    (attention written in a loop, too many paths)."""
    res = _paths(stmts, lambda node: _attention_counts(node, helpers, this))
    if res is None:
        return None
    open_, done = res
    return open_ | done


def _add(a: tuple, b: tuple) -> tuple:
    return tuple(x + y for x, y in zip(a, b))


def _paths(stmts: list[ast.stmt], count) -> tuple[set, set] | None:
    """(counts of the paths that run off the end, counts of the paths that returned)."""
    open_, done = {(0, 0, 0)}, set()
    for st in stmts:
        if isinstance(st, ast.If):
            body, orelse = _paths(st.body, count), _paths(st.orelse, count)
            if body is None or orelse is None:
                return None
            test = count(st.test)
            new = {_add(_add(p, test), d) for p in open_ for d in body[0] | orelse[0]}
            done |= {_add(_add(p, test), d) for p in open_ for d in body[1] | orelse[1]}
            open_ = new
        elif isinstance(st, ast.Return):
            done |= {_add(p, count(st)) for p in open_}
            open_ = set()
        elif isinstance(st, ast.Raise):
            open_ = set()
        elif isinstance(st, (ast.With, ast.AsyncWith)):
            inner = _paths(st.body, count)
            if inner is None:
                return None
            items = (0, 0, 0)
            for item in st.items:
                items = _add(items, count(item.context_expr))
            done |= {_add(_add(p, items), d) for p in open_ for d in inner[1]}
            open_ = {_add(_add(p, items), d) for p in open_ for d in inner[0]}
        elif isinstance(st, (ast.For, ast.AsyncFor, ast.While)) and count(st) != (0, 0, 0):
            return None                  # attention inside a loop: as many as it iterates
        else:
            c = count(st)
            open_ = {_add(p, c) for p in open_}
        if len(open_) + len(done) > _MAX_PATHS:
            return None
        if not open_:
            break
    return open_, done


def _patch_sdpa_callers(model: nn.Module, config: QuantConfig) -> list[ReportEntry]:
    if _is_hf_model(model):
        return []
    entries = []
    candidates = [(name, mod) for name, mod in model.named_modules() if _calls_sdpa(mod) or _computes_attention(mod)]
    ids = {id(mod) for _, mod in candidates}
    for name, mod in candidates:
        # The redirect sees every MatMul under the module, its submodules' too: a module holding
        # another attention (a block around an attention layer) would quantize that one twice.
        inner = next((n for n, sub in mod.named_modules() if n and (
            id(sub) in ids or isinstance(sub, (BWTAAttention, BWTAMultiheadAttention, nn.MultiheadAttention)))), None)
        if inner is not None:
            entries.append(ReportEntry(name or "<root>", "attention", "float",
                                       f"holds attention submodule {inner}; its own matmul/softmax stay float"))
            continue
        if not config.attention or config.choice(name) != "bwta":
            entries.append(ReportEntry(name, "attention", "float", "kept float by rule"))
            continue
        _redirect(model, mod, config)
        how = "F.scaled_dot_product_attention" if _calls_sdpa(mod) else "matmul/softmax attention"
        entries.append(ReportEntry(name or "<root>", "attention", "bwta", f"{how} redirected"))
    return entries


def report_lines(model: nn.Module) -> list[str]:
    """Human-readable summary of what :func:`quantize` did."""
    entries: list[ReportEntry] = getattr(model, "bwta_report", [])
    n_bwta = sum(e.choice == "bwta" for e in entries)
    lines = [f"{n_bwta} of {len(entries)} linear/attention operators quantized to BWTA"]
    lines += [f"  float: {e.name} ({e.kind}) {e.reason}" for e in entries if e.choice != "bwta"]
    return lines
