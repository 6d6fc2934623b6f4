"""Save a model compiled with bwta to a file; load it in another process without tracing again.

Why: ``torch.compile`` traces a model again in every new process.  With bwta's kernel cache and
inductor's caches warm, the BERT-base-sized encoder still spent ~6 s in Dynamo and ~5 s in
AOTAutograd before its first output here (25 s from process start).  :func:`save_compiled` runs
bwta's compile once through torch's ahead-of-time capture (``torch.compile(...).aot_compile``,
experimental in torch 2.13) and writes Dynamo's guards and bytecode together with bwta's compiled
graph; :func:`load_compiled` reads them back, checks the guards on each call and runs the graph.

What the file holds for bwta's graph (:class:`SavedGraph`): the aten graph after the passes, with
its fused ops already pointing at kernels by name; the selector's choice for each kernel (reloaded
through the kernel cache, or generated and compiled again on a machine that lacks it); and where
each packed weight comes from (packed again from the parameters of the model it is called with,
so the file holds no weights).  The float remainder of the graph runs eagerly (inductor's compiled
code is not part of the file).

Inference only (the model runs under ``torch.no_grad()``).  A file that cannot be read, was written
by another torch, or whose guards reject a call (another model structure, a dtype or shape outside
what was saved) warns once and runs the model without bwta, losing nothing.
"""

from __future__ import annotations

import functools
import os
import pickle
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.aot_compile_types import SerializableCallable
from torch.fx import GraphModule

from . import config as config_mod
from . import kernel_registry
from .errors import BWTAError, UnsupportedError
from .weight_binding import WeightBinder

FORMAT_VERSION = 1


def _call_model(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    # The function torch captures: its code object and this module's globals are what a file replays.
    return model(*args, **kwargs)


class SavedGraph(SerializableCallable):
    """bwta's compiled graph in a form torch's ahead-of-time path can write and read back."""

    def __init__(self, gm: GraphModule, binder: WeightBinder, kernels: dict[str, Any]) -> None:
        self.gm = gm
        self.binder = binder
        self.kernels = kernels          # kernel name in the graph -> KernelChoice

    def __call__(self, *args: Any) -> Any:
        return self.binder(list(args))

    @classmethod
    def serialize_compile_artifacts(cls, fn: SavedGraph) -> bytes:
        from torch.fx._graph_pickler import GraphPickler, Options

        gm = fn.gm
        for node in gm.graph.nodes:   # running the graph needs no meta (fake values, stack traces)
            node.meta = {}
        covered = {s for _, p, a in fn.binder.slots for s in (p, a) if s is not None}
        state = {
            "format": FORMAT_VERSION,
            "graph": GraphPickler.dumps(gm, Options(ops_filter=None)),
            "kernels": fn.kernels,
            "slots": fn.binder.slots,
            "base": [None if i in covered else t for i, t in enumerate(fn.binder.base)],
            "pad_bits": fn.binder.pad_bits,
        }
        return pickle.dumps(state)

    @classmethod
    def deserialize_compile_artifacts(cls, data: bytes) -> SavedGraph:
        from torch._subclasses import FakeTensorMode
        from torch.fx._graph_pickler import GraphPickler
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        from . import launch_ops, runtime_bridge  # noqa: F401  (launch_ops defines bwta::*_launch)

        state = pickle.loads(data)
        if state.get("format") != FORMAT_VERSION:
            raise BWTAError(f"bwta saved graph format {state.get('format')!r}, this bwta reads {FORMAT_VERSION}")
        cfg = config_mod.resolve({"pad_bits": state["pad_bits"]})
        for name, choice in state["kernels"].items():
            kernel, why = runtime_bridge.load(choice, cfg)
            if kernel is None:
                raise BWTAError(f"bwta saved graph: kernel {name} ({choice.describe()}) cannot be loaded: {why}")
            kernel_registry.register(name, kernel)
        gm = GraphPickler.loads(state["graph"], FakeTensorMode(shape_env=ShapeEnv()))
        gm.recompile()
        binder = WeightBinder(_boxed(gm.forward), state["slots"], state["base"], state["pad_bits"])
        return cls(gm, binder, state["kernels"])


def _boxed(forward: Callable) -> Callable:
    """``forward`` with the boxed calling convention (one list of inputs) that WeightBinder's callee
    has: AOTAutograd's ``make_boxed_func``, without importing AOTAutograd (~0.3 s of a load)."""
    def run(args: list) -> Any:
        return forward(*args)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


def _plain_inference_graph(captured: dict, n_example_inputs: int) -> str:
    """Why AOTAutograd's runtime wrapper does more than call the graph ("" when it does not): a
    saved graph is called with Dynamo's inputs directly, so it must not need that wrapper."""
    from torch._functorch._aot_autograd.schemas import OutputType

    meta = captured["fw_metadata"]
    if meta is None:
        return "no AOTAutograd metadata"
    if captured["n_inputs"] != n_example_inputs:
        return f"AOTAutograd changed the inputs ({n_example_inputs} -> {captured['n_inputs']}: duplicated inputs)"
    if any(i.mutates_data or i.mutates_metadata for i in meta.input_info):
        return "the model writes to one of its inputs or parameters in place"
    aliased = [i for i, o in enumerate(meta.output_info) if o.output_type != OutputType.non_alias]
    if aliased:
        return f"outputs {aliased} alias inputs or each other (views): AOTAutograd rebuilds them at run time"
    if getattr(meta, "tokens", None) or getattr(meta, "num_intermediate_bases", 0):
        return "effect tokens or intermediate bases in the graph"
    from torch._functorch._aot_autograd.schemas import SubclassCreationMeta

    if any(isinstance(m, SubclassCreationMeta) for m in getattr(meta, "subclass_inp_meta", None) or ()):
        return "tensor subclass inputs"
    return ""


def _saving_backend(options: dict[str, Any]) -> Callable:
    from torch._dynamo.backends.common import aot_autograd

    from .backend import _compile_inference, _constant_inputs, _decompositions
    from .debug import next_graph_id

    def backend(gm: GraphModule, example_inputs: list) -> SavedGraph:
        cfg = config_mod.resolve({**options, "fallback": "eager"})
        captured: list[dict] = []
        constants = _constant_inputs(gm, example_inputs)
        inference = functools.partial(_compile_inference, cfg=cfg, constants=constants, graph_id=next_graph_id(),
                                      capture=captured)
        # Inference tensors (a model built under torch.inference_mode()) reach AOTAutograd as real
        # tensors here, and its functionalization cannot mirror their autograd state: give it
        # Dynamo's fake values for them (their real values stay in ``constants`` for folding).
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        inputs = [n.meta.get("example_value", v) if isinstance(v, torch.Tensor) and v.is_inference() else v
                  for n, v in zip(placeholders, example_inputs)]
        # torch's ahead-of-time capture asks AOTAutograd for a cacheable (inductor) result; bwta's
        # graph is saved by SavedGraph instead.
        with torch._functorch.config.patch(strict_autograd_cache=False, force_autograd_cache=False,
                                           bundled_autograd_cache=False):
            aot_autograd(fw_compiler=inference, inference_compiler=inference,
                         decompositions=_decompositions(cfg))(gm, inputs)
        if not captured:
            raise UnsupportedError("bwta could not compile this model (see the warning above and "
                                   "bwta_compiler.last_report()); nothing to save")
        why = _plain_inference_graph(captured[0], len(example_inputs))
        if why:
            raise UnsupportedError(f"bwta save_compiled: {why}")
        g = captured[0]["gm"]
        kernels = {n.kwargs["kernel_id"]: n.meta["bwta_choice"] for n in g.graph.nodes
                   if n.op == "call_function" and n.kwargs.get("kernel_id") and "bwta_choice" in n.meta}
        return SavedGraph(g, captured[0]["binder"], kernels)

    return backend


def save_compiled(model: torch.nn.Module, args: tuple, path: str | Path, *, kwargs: dict | None = None,
                  more_calls: Sequence[tuple[tuple, dict]] = (), options: dict[str, Any] | None = None,
                  dynamic: bool = True) -> None:
    """Compile ``model`` with bwta for calls like ``model(*args, **kwargs)`` and write the result
    to ``path``.  The whole forward must be one graph (no graph breaks); ``dynamic=True`` keeps
    sizes (batch, tokens) symbolic so that other sizes reuse the file.  ``more_calls``: further
    ``(args, kwargs)`` examples compiled into the same file, for calls the first one's guards
    would reject (a decoder's prefill and its decode step; a KV cache a step produced, whose
    strides differ from the prefill's).  Raises UnsupportedError when the model cannot be saved
    (the reason is in the message); nothing is written then."""
    calls = [(tuple(args), dict(kwargs or {}))] + [(tuple(a), dict(k or {})) for a, k in more_calls]
    entries = [_compile_call(model, a, k, dict(options or {}), dynamic).serialized_data for a, k in calls]
    blob = pickle.dumps({"bwta_saved_model": FORMAT_VERSION, "entries": entries})
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)             # atomic: a reader never sees half a file


def _compile_call(model: torch.nn.Module, args: tuple, kwargs: dict, options: dict[str, Any], dynamic: bool):
    from torch._dynamo.aot_compile import AOTCompiledFunction

    # Python floats stay constants (as in a plain torch.compile, whose restart on a float input
    # the ahead-of-time capture does not have); sizes of 1 stay symbolic too (a file saved at
    # batch 2 serves batch 1: one request, decoding); no duck sizing (a KV cache [B, H_kv, T, D]
    # saved at B = H_kv = 2 tied the batch to the model's head count).
    with torch.no_grad(), torch._dynamo.config.patch(specialize_float=True), \
            torch.fx.experimental._config.patch(backed_size_oblivious=dynamic, use_duck_shape=not dynamic):
        compiled = torch.compile(_call_model, fullgraph=True, dynamic=dynamic, backend=_saving_backend(options))
        try:
            fn = compiled.aot_compile(((model, args, kwargs), {}))
            return AOTCompiledFunction.serialize(fn)
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as e:
            raise UnsupportedError(f"bwta save_compiled: the forward of {type(model).__name__} must trace as one "
                                   f"graph: {str(e).splitlines()[0]}") from e
        except torch._dynamo.exc.PackageError as e:
            # e.g. HF models: their forward reads objects by identity (ID_MATCH guards), which torch
            # 2.13 cannot write to a file; torch.compile(model, backend="bwta") still compiles them.
            raise UnsupportedError(f"bwta save_compiled: torch cannot save the guards of {type(model).__name__}'s "
                                   f"forward ({e}); compile it with torch.compile(backend='bwta') instead") from e


def _read(path: str | Path) -> list:
    from torch._dynamo.aot_compile import AOTCompiledFunction

    state = pickle.loads(Path(path).read_bytes())
    if not isinstance(state, dict) or state.get("bwta_saved_model") != FORMAT_VERSION:
        raise BWTAError(f"not a bwta saved model of format {FORMAT_VERSION}")
    fns = [AOTCompiledFunction.deserialize(data, f_globals=globals()) for data in state["entries"]]
    for fn in fns:
        fn.disable_guard_check()      # run() checks them once per call itself
    return fns


def load_compiled(model: torch.nn.Module, path: str | Path) -> Callable[..., Any]:
    """``fn(*args, **kwargs)`` running ``model`` through the bwta graphs saved at ``path`` (the
    first whose guards accept the call).  A file that cannot be loaded, or a call no graph's
    guards accept, warns and runs ``model`` as it is.  The file is a pickle: load only files you
    trust (as with ``torch.load(weights_only=False)``)."""
    fns: list = []
    try:
        fns = _read(path)
    except Exception as e:  # noqa: BLE001  (never lose the user's model to a bad file)
        warnings.warn(f"bwta: cannot load the compiled model {str(path)!r} ({type(e).__name__}: {e}); "
                      "running the model without bwta", stacklevel=2)
    warned: list[bool] = []

    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            for fn in fns:
                if fn.guard_check(model, args, kwargs):
                    return fn(model, args, kwargs)
            if fns and not warned:
                warned.append(True)
                why = "; ".join(f"graph {i}: {_failed_guard(fn, model, args, kwargs)}" for i, fn in enumerate(fns))
                warnings.warn(f"bwta: the compiled model {str(path)!r} does not fit this call (failed guards: {why}); "
                              "running the model without bwta", stacklevel=2)
            return model(*args, **kwargs)

    return run


def _failed_guard(fn: Any, model: torch.nn.Module, args: tuple, kwargs: dict) -> str:
    info = fn._artifacts.guard_manager.check_verbose(fn.prepare_f_locals(model, args, kwargs))
    parts = getattr(info, "verbose_code_parts", None) or [str(info)]
    return parts[0].split("  #")[0].strip()
