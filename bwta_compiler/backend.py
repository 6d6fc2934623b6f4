"""The ``torch.compile`` backend ``"bwta"`` (registered through the ``torch_dynamo_backends`` entry
point, so ``torch.compile(model, backend="bwta")`` works without importing this package first).

Flow per Dynamo graph: AOTAutograd lowers it to aten (fake tensors, dynamic token dimension);
for inference graphs the pass pipeline folds weight packing and fuses quantize -> pack -> MatMul
-> epilogue into ``bwta::`` ops; the selected kernels are generated, compiled (cached) and bound;
the rest of the graph runs through the ``fallback`` compiler (inductor or eager).  Nothing bwta
cannot handle aborts a compile: it runs as it would without bwta, and the report says why.
"""

from __future__ import annotations

import copy
import functools
import logging
import operator
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx import GraphModule

from . import config as config_mod
from . import kernel_registry
from .config import Config
from .debug import DebugDump, next_graph_id
from .errors import BWTAError, UnsupportedError
from .launch_ops import LAUNCH
from .report import GraphReport, add_graph
from .weight_binding import WeightBinder, lift_constants

log = logging.getLogger("bwta_compiler.backend")


def bwta_backend(gm: GraphModule, example_inputs: Sequence[Any], options: dict | None = None, **kwargs: Any):
    """Dynamo backend entry: ``torch.compile(model, backend="bwta", options={...})``."""
    if kwargs.get("mode") not in (None, "default"):
        raise ValueError(f"bwta backend: unsupported mode {kwargs['mode']!r}; pass settings through options=")
    cfg = config_mod.resolve(options)
    constants = _constant_inputs(gm, example_inputs)
    graph_id = next_graph_id()
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
    if needs_grad:
        return _compile_training(gm, example_inputs, cfg, graph_id)
    inference = functools.partial(_compile_inference, cfg=cfg, constants=constants, graph_id=graph_id)
    return aot_autograd(fw_compiler=inference, inference_compiler=inference,
                        decompositions=_decompositions(cfg))(gm, example_inputs)


def _decompositions(cfg: Config) -> dict:
    # Inductor lowers only graphs decomposed with its own table; bwta's ops are custom ops, which
    # no table decomposes, so the patterns the passes match are unaffected.
    if cfg.fallback != "inductor":
        return {}
    from torch._inductor.decomposition import select_decomp_table

    # Inductor rewrites tiny MatMuls (a length-1 contraction or output dim: attention over one key,
    # a K = 1 linear) into pointwise ops; kept as MatMuls, the passes see (and report) every one, and
    # inductor still lowers the float ones itself.
    keep = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default}
    return {op: fn for op, fn in select_decomp_table().items() if op not in keep}


def _constant_inputs(gm: GraphModule, example_inputs: Sequence[Any]) -> dict[int, torch.Tensor]:
    """Graph inputs that are module parameters or buffers (frozen for the compiled graph)."""
    out = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(value, torch.Tensor):
            continue
        grapharg = node.meta.get("grapharg")
        source = getattr(getattr(grapharg, "source", None), "name", "") or ""
        source = source() if callable(source) else source
        # Without a grapharg (torch's ahead-of-time capture), the placeholder's name still spells
        # its source: L['model']._buffers['w'] -> l_model_buffers_w_.
        named = grapharg is None and ("_buffers_" in node.name or "_parameters_" in node.name)
        if isinstance(value, torch.nn.Parameter) or "_buffers[" in source or "_parameters[" in source or named:
            out[i] = value
    return out


# ---- training graphs: no packed kernels, quantizers' straight-through backward ----------------


_TORCH_MATMULS = (torch.nn.functional.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm,
                  operator.matmul)
_METHOD_MATMULS = ("matmul", "mm", "bmm", "__matmul__")


def _compile_training(gm: GraphModule, example_inputs, cfg: Config, graph_id: int):
    from bwta_compiler.passes import MatmulRecord

    rep = GraphReport(graph_id, mode="training")
    rep.notes.append("graph needs gradients: it trains through the quantizers' straight-through backward; "
                     "run under torch.no_grad() / torch.inference_mode() to use the low-bit kernels")
    # Every MatMul of a training graph runs in float (on fake-quantized codes): counted as such.
    rep.matmuls = [MatmulRecord(n.name, getattr(n.target, "__name__", str(n.target)), reason="training graph")
                   for n in gm.graph.nodes
                   if (n.op == "call_function" and n.target in _TORCH_MATMULS)
                   or (n.op == "call_method" and n.target in _METHOD_MATMULS)]
    add_graph(rep)
    log.info(rep.summary())
    dump = DebugDump(cfg.debug_dir, graph_id)
    dump.graph(0, "input", gm)
    dump.text("report.txt", "\n".join(rep.lines()) + "\n")
    if cfg.fallback == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)
    eager = lambda g, _inputs: make_boxed_func(g.forward)
    return aot_autograd(fw_compiler=eager, bw_compiler=eager)(gm, example_inputs)


# ---- inference graphs: the pass pipeline, kernel binding, fallback compile ---------------------


def _compile_inference(gm: GraphModule, fake_inputs: Sequence[Any], cfg: Config, constants: dict, graph_id: int,
                       capture: list | None = None):
    """The pass pipeline, kernel binding and fallback compile of one inference graph.  With
    ``capture`` (bwta_compiler.precompile), the bound graph runs eagerly and the pieces a saved
    artifact needs are appended to it."""
    from bwta_compiler.passes import PIPELINE, PassContext, run_pipeline

    dump = DebugDump(cfg.debug_dir, graph_id)
    rep = GraphReport(graph_id)
    # A second module over a copy of the graph (sharing the constants, which passes never mutate)
    # so that a failed pipeline can still run the untouched graph.
    original = GraphModule(gm, copy.deepcopy(gm.graph))
    ctx = PassContext(cfg=cfg, target=_target(cfg, fake_inputs))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) == len(fake_inputs):
        for i, node in enumerate(placeholders):
            ctx.input_index[node.target] = i
            if i in constants and _same_shape(constants[i], fake_inputs[i]):
                ctx.params[node.target] = constants[i]
    else:
        rep.notes.append("graph inputs do not line up with the Dynamo inputs: weights not folded")
    try:
        # Passes compute real constants (packed weights): leave the fake mode AOTAutograd set.
        with unset_fake_temporarily():
            t0 = time.perf_counter()
            gm = run_pipeline(gm, ctx, PIPELINE, dump)
            t1 = time.perf_counter()
            _bind_kernels(gm, ctx, rep, dump)
            rep.seconds.update(passes=t1 - t0, kernels=time.perf_counter() - t1)
            dump.graph(len(PIPELINE) + 1, "bound_kernels", gm)   # what the fallback compiler gets
    except BWTAError as e:
        if cfg.strict:
            raise
        return _give_up(original, fake_inputs, cfg, rep, dump, f"bwta passes failed: {e}")
    except Exception as e:  # never lose the user's model to a bwta bug
        if cfg.strict:
            raise
        return _give_up(original, fake_inputs, cfg, rep, dump, f"bwta failed: {type(e).__name__}: {e}")
    rep.matmuls = list(ctx.matmuls.values())
    _weight_bytes(gm, ctx, rep)
    if dump.enabled:
        from .graph_analysis import describe

        dump.text("regions.txt", describe(gm))
    if cfg.strict and rep.lowbit < len(rep.matmuls):
        _finish_report(rep, dump, ctx)
        raise UnsupportedError("bwta strict mode: MatMuls that cannot run in low bit:\n" + "\n".join(rep.lines()[1:]))
    t0 = time.perf_counter()
    names, tensors, fakes = lift_constants(gm, fake_inputs)
    if capture is None:
        compiled = _fallback_compile(gm, [*fake_inputs, *fakes], cfg, rep)
    else:
        compiled = make_boxed_func(gm.forward)
    rep.seconds[f"fallback ({cfg.fallback})"] = time.perf_counter() - t0
    _finish_report(rep, dump, ctx)
    folded = [(fw, ctx.params.get(_name_of(ctx, fw.input_index))) for fw in ctx.folded]
    folded = [(fw, t) for fw, t in folded if t is not None]
    binder = WeightBinder(compiled, WeightBinder.slots_of([fw for fw, _ in folded], names), tensors, cfg.pad_bits,
                          params=[t for _, t in folded])
    if capture is not None:
        tracing = torch._guards.TracingContext.try_get()
        capture.append({"gm": gm, "binder": binder, "n_inputs": len(fake_inputs),
                        "fw_metadata": getattr(tracing, "fw_metadata", None)})
    return binder


def _same_shape(real: torch.Tensor, fake: Any) -> bool:
    return isinstance(fake, torch.Tensor) and tuple(real.shape) == tuple(fake.shape) and real.dtype == fake.dtype


def _target(cfg: Config, fake_inputs: Sequence[Any]) -> str:
    if cfg.target != "auto":
        return cfg.target
    cuda = any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in fake_inputs)
    return "cuda" if cuda else "cpu"


def _give_up(original: GraphModule, fake_inputs, cfg: Config, rep: GraphReport, dump: DebugDump, why: str):
    from bwta_compiler.passes.normalize_matmul import float_matmul_records
    from bwta_compiler.passes.patterns import MATMUL_OPS

    warnings.warn(f"{why}; graph {rep.graph_id} runs without bwta", stacklevel=2)
    rep.mode = "failed"
    rep.notes.append(why)
    # Every MatMul of the graph runs in float: count them as a compiled graph's report does (the
    # graph is the one before the passes, so linear is still one op), so the totals stay honest.
    plain = MATMUL_OPS | {torch.ops.aten.linear.default}
    rep.matmuls = [record for n in original.graph.nodes
                   for record in float_matmul_records(n, "graph runs without bwta (see note)", plain)]
    dump.text("report.txt", "\n".join(rep.lines()) + "\n")
    add_graph(rep)
    return _fallback_compile(original, fake_inputs, cfg, rep)


def _fallback_compile(gm: GraphModule, fake_inputs, cfg: Config, rep: GraphReport) -> Callable:
    if cfg.fallback == "inductor":
        try:
            from torch._inductor.compile_fx import compile_fx_inner

            # The packed weights are real constants on the module: let inductor's fake
            # propagation lift them instead of rejecting them.
            mode = torch._guards.detect_fake_mode(fake_inputs)
            saved = getattr(mode, "allow_non_fake_inputs", None)
            if mode is not None:
                mode.allow_non_fake_inputs = True
            try:
                return compile_fx_inner(gm, fake_inputs)
            finally:
                if mode is not None:
                    mode.allow_non_fake_inputs = saved
        except Exception as e:  # inductor cannot take some graphs: eager still runs them
            warnings.warn(f"bwta: inductor failed on graph {rep.graph_id} ({type(e).__name__}: {e}); using eager",
                          stacklevel=2)
            rep.notes.append(f"inductor fallback failed, eager used: {type(e).__name__}")
    return make_boxed_func(gm.forward)


def _bind_kernels(gm: GraphModule, ctx, rep: GraphReport, dump: DebugDump) -> None:
    """Generate, compile (through the cache) and bind the kernel chosen for every fused node."""
    from bwta_compiler import runtime_bridge

    for node in gm.graph.nodes:
        choice = node.meta.get("bwta_choice")
        if choice is None:
            continue
        name = ""
        if not choice.template:
            if choice.reason:
                rep.notes.append(f"{node.name}: {choice.reason}")
        else:
            kernel, why = runtime_bridge.load(choice, ctx.cfg)
            if kernel is None:
                rep.notes.append(f"{node.name}: {why}; reference op used")
            else:
                name = kernel.name
                kernel_registry.register(name, kernel)
                node.kwargs = dict(node.kwargs, kernel_id=name)
                # The launch twin calls the kernel without custom_op's per-call Python layers.
                node.target = LAUNCH.get(node.target, node.target)
                dump.kernel(name, kernel.source, runtime_bridge.source_suffix(choice.target), kernel.key_lines,
                            kernel.log, choice.params.to_json())
        rep.kernels.append((node.name, choice.describe(), name))
    gm.recompile()


def _weight_bytes(gm: GraphModule, ctx, rep: GraphReport) -> None:
    for fw in ctx.folded:
        packed = getattr(gm, fw.packed_attr, None)
        if packed is None:
            continue
        rep.packed_weight_bytes += packed.numel() * 4 + packed.shape[0] * 4   # words + fp32 alpha
    rep.float_weight_bytes = sum(t.numel() * t.element_size() for name, t in ctx.params.items()
                                 if any(ctx.input_index.get(name) == fw.input_index for fw in ctx.folded))


def _finish_report(rep: GraphReport, dump: DebugDump, ctx) -> None:
    add_graph(rep)
    for line in rep.lines():
        log.info(line)
    dump.text("report.txt", "\n".join(rep.lines()) + "\n" + "\ncounters:\n" +
              "".join(f"  {k}: {v}\n" for k, v in sorted(ctx.counters.items())))
    dump.text("kernels.txt", rep.kernel_table())


def _name_of(ctx, index: int) -> str:
    for name, i in ctx.input_index.items():
        if i == index:
            return name
    return ""
