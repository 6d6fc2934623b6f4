"""``bwta compile`` and ``bwta bench``: the ONNX subcommands of the ``bwta`` command line.

``setup_compile`` / ``setup_bench`` match ``bwta_compiler.cli.SUBCOMMANDS`` (they receive their
subparser); ``add_compile_parser`` / ``add_bench_parser`` add the subcommand to an argparse
``subparsers`` object themselves.  Nothing here imports onnx or torch until a command runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, Optional

COMPILE_HELP = "import an ONNX model, compile it with bwta and print the low-bit coverage report and kernel table"
BENCH_HELP = "time an ONNX model compiled with bwta against the float model"


class Progress:
    """``[i/n] step ... done (t s)`` lines on stderr, so stdout keeps only the results."""

    def __init__(self, total: int, stream=None) -> None:
        self.total, self.i, self.stream = total, 0, stream or sys.stderr

    def step(self, text: str) -> Progress:
        self.i += 1
        self.t0 = time.perf_counter()
        print(f"[{self.i}/{self.total}] {text} ...", file=self.stream, flush=True)
        return self

    def __enter__(self) -> Progress:  # noqa: PYI034
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            print(f"      done ({time.perf_counter() - self.t0:.2f} s)", file=self.stream, flush=True)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="path to the .onnx file (external weight files are found next to it)")
    parser.add_argument("--target", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the low-bit kernels run (default: auto = cuda when available, else cpu)")
    parser.add_argument("--quantize", action="store_true",
                        help="quantize a float model's linear layers to BWTA on import (bwta_compiler.quantize rules)")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the generated example inputs (default 1)")
    parser.add_argument("--seq", type=int, default=16, help="sequence length of the generated example inputs (default 16)")
    parser.add_argument("--option", "-o", action="append", default=[], metavar="NAME=VALUE",
                        help="a bwta config option, e.g. -o strict=1 -o fallback=eager (repeatable)")


def setup_compile(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument("--dump", metavar="DIR", default="",
                        help="write the graphs after each pass, the kernel table and kernel sources to DIR")
    parser.epilog = ("example: bwta compile model.onnx --target cpu --dump /tmp/bwta-dump\n"
                     "The model runs once on generated inputs (ids for int64 inputs, ones for *mask* inputs, "
                     "normal floats otherwise); dynamic dims take --batch and --seq.")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.set_defaults(func=run_compile)


def setup_bench(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument("--iters", type=int, default=20, help="timed iterations (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations after compiling (default 3)")
    parser.add_argument("--float-model", metavar="PATH", default="",
                        help="the float ONNX model to compare against (default: the same file compiled by "
                             "inductor; a BWTA file then runs its ai.bwta ops as float GEMMs on the codes, the "
                             "MatMul cost of the float model plus quantization, not the float model itself)")
    parser.epilog = "example: bwta bench model.onnx --seq 128 --iters 50"
    parser.set_defaults(func=run_bench)


def add_compile_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compile", help=COMPILE_HELP, description=COMPILE_HELP)
    setup_compile(p)
    return p


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help=BENCH_HELP, description=BENCH_HELP)
    setup_bench(p)
    return p


# ---- shared helpers -----------------------------------------------------------------------------


class CliError(ValueError):
    """A bad command line: the handlers print ``bwta: <message>`` (one line) and exit with 2."""


def _fail(message: object) -> int:
    print(f"bwta: {message}", file=sys.stderr)
    return 2


def _options(args: argparse.Namespace, **extra: Any) -> dict:
    """The ``-o NAME=VALUE`` options (plus ``--target`` and ``extra``), checked by
    ``bwta_compiler.config.resolve``: an unknown name or a bad value raises ``CliError``."""
    from .. import config

    opts: dict[str, Any] = {}
    for item in args.option:
        if "=" not in item:
            raise CliError(f"--option expects NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        opts[k.strip()] = v.strip()
    if args.target != "auto":
        opts["target"] = args.target
    opts.update({k: v for k, v in extra.items() if v})
    try:
        config.resolve(opts)
    except ValueError as e:
        raise CliError(str(e)) from None
    return opts


def _check_sizes(args: argparse.Namespace) -> None:
    """--batch and --seq (and bench's --iters / --warmup) must make sense before anything runs."""
    for name, minimum in (("batch", 1), ("seq", 1), ("iters", 1), ("warmup", 0)):
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            kind = "a positive integer" if minimum == 1 else "a non-negative integer"
            raise CliError(f"--{name} must be {kind}, got {value}")


def example_inputs(path: str, batch: int, seq: int, seed: int = 0) -> list:
    """Inputs for the graph inputs of ``path``: dynamic dims become ``batch`` (first) / ``seq``;
    int64 inputs get token ids below the smallest embedding table they index (or ones for masks)."""
    import onnx
    import torch

    from .importer import ONNX_TO_TORCH

    m = onnx.load(path, load_external_data=False)
    inits = {t.name: list(t.dims) for t in m.graph.initializer}
    vocab: dict[str, int] = {}
    for n in m.graph.node:
        if n.op_type == "Gather" and len(n.input) == 2 and n.input[0] in inits:
            vocab[n.input[1]] = min(vocab.get(n.input[1], 1 << 30), inits[n.input[0]][0])
    gen = torch.Generator().manual_seed(seed)
    out = []
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            # Rank unknown (a stripped or hand-written file): a guessed rank would fail deep in the
            # compiled graph, so say which input needs a shape.
            raise CliError(f"{path}: graph input {vi.name!r} has no shape, so no example input can be made for "
                           f"it; give it one (onnx.tools.update_model_dims.update_inputs_outputs_dims)")
        dims = []
        for i, d in enumerate(tt.shape.dim):
            dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (batch if i == 0 else seq))
        dtype = ONNX_TO_TORCH.get(tt.elem_type, torch.float32)
        if dtype.is_floating_point:
            out.append(torch.randn(dims, generator=gen).to(dtype))
        elif "mask" in vi.name.lower():
            out.append(torch.ones(dims, dtype=dtype))
        else:
            out.append(torch.randint(0, max(1, vocab.get(vi.name, 2)), dims, generator=gen).to(dtype))
    return out


def _report_lines() -> tuple[list[str], list[str]]:
    try:
        from ..report import last_report
    except ImportError:  # pragma: no cover - backend missing
        return ["(the bwta backend report is not available)"], []
    rep = last_report()
    tables = [g.kernel_table() for g in rep.graphs if getattr(g, "kernels", None)]
    return list(rep.lines()), tables


def _reset_report() -> None:
    try:
        from ..report import reset_reports
    except ImportError:  # pragma: no cover
        return
    reset_reports()


def _import(args: argparse.Namespace, progress: Progress, path: str = "", quantize: bool | None = None,
            text: str = ""):
    """Import ``path`` (default ``args.model``, quantized with ``--quantize``) under a progress step;
    an ``OnnxImportError`` becomes one ``bwta: ...`` line on stderr and ``None``."""
    from ..errors import OnnxImportError
    from .importer import import_model

    if not path:
        path, quantize = args.model, (True if args.quantize else None)
        text = f"importing {path}" + (" and quantizing to BWTA" if args.quantize else "")
    try:
        with progress.step(text or f"importing {path}"):
            gm = import_model(path, quantize=quantize)
    except OnnxImportError as e:
        _fail(e)
        return None
    n_bwta = sum(1 for n in gm.graph.nodes if n.op == "call_function" and "bwta" in str(n.target))
    print(f"      {len(gm.graph.nodes)} FX nodes, {n_bwta} bwta ops", file=progress.stream)
    return gm


# ---- bwta compile -------------------------------------------------------------------------------


def run_compile(args: argparse.Namespace) -> int:
    try:
        _check_sizes(args)
        opts = _options(args, debug_dir=args.dump)
    except CliError as e:
        return _fail(e)
    import torch

    progress = Progress(3)
    gm = _import(args, progress)
    if gm is None:
        return 2
    try:
        inputs = example_inputs(args.model, args.batch, args.seq)
    except CliError as e:
        return _fail(e)
    _reset_report()
    with progress.step(f"compiling with bwta (options {opts or 'default'}); the first call generates and "
                       f"compiles the kernels"):
        compiled = torch.compile(gm, backend="bwta", options=opts or None)
        with torch.no_grad():
            compiled(*inputs)
    with progress.step("collecting the report"):
        lines, tables = _report_lines()
    print("\n".join(lines))
    for t in tables:
        print()
        print(t, end="")
    if args.dump:
        print(f"\ndebug dump written to {args.dump}")
    return 0


# ---- bwta bench ---------------------------------------------------------------------------------


def _time(fn: Callable, inputs: list, iters: int, warmup: int, cuda: bool) -> list[float]:
    import torch

    with torch.no_grad():
        for _ in range(warmup):
            fn(*inputs)
        times = []
        for _ in range(iters):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn(*inputs)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return times


def run_bench(args: argparse.Namespace) -> int:
    try:
        _check_sizes(args)
        opts = _options(args)
    except CliError as e:
        return _fail(e)
    import torch

    progress = Progress(6)
    gm = _import(args, progress)
    if gm is None:
        return 2
    cuda = args.target == "cuda" or (args.target == "auto" and torch.cuda.is_available())
    device = "cuda" if cuda else "cpu"
    try:
        inputs = [x.to(device) for x in example_inputs(args.model, args.batch, args.seq)]
    except CliError as e:
        return _fail(e)
    float_path = args.float_model or args.model
    base = _import(args, progress, float_path, None, f"importing the float baseline {float_path}")
    if base is None:
        return 2
    with progress.step("compiling the float baseline with inductor"):
        base = base.to(device)
        base_c = torch.compile(base, backend="inductor")
        _time(base_c, inputs, 1, 0, cuda)
    gm = gm.to(device)
    _reset_report()
    with progress.step("compiling with bwta"):
        compiled = torch.compile(gm, backend="bwta", options=opts or None)
        _time(compiled, inputs, 1, 0, cuda)
    with progress.step(f"timing float ({args.iters} iterations)"):
        t_float = _time(base_c, inputs, args.iters, args.warmup, cuda)
    with progress.step(f"timing bwta ({args.iters} iterations)"):
        t_bwta = _time(compiled, inputs, args.iters, args.warmup, cuda)
    lines, _ = _report_lines()
    mf, mb = statistics.median(t_float), statistics.median(t_bwta)
    shapes = ", ".join(f"{tuple(x.shape)}" for x in inputs)
    print(f"model {args.model} on {device}, inputs {shapes}")
    print(f"float (inductor): median {mf * 1e3:9.3f} ms  (min {min(t_float) * 1e3:.3f})")
    print(f"bwta            : median {mb * 1e3:9.3f} ms  (min {min(t_bwta) * 1e3:.3f})")
    print(f"speedup         : {mf / mb:.2f}x")
    print(lines[0] if lines else "")
    return 0


__all__ = ["BENCH_HELP", "COMPILE_HELP", "CliError", "Progress", "add_bench_parser", "add_compile_parser", "example_inputs",
           "run_bench", "run_compile", "setup_bench", "setup_compile"]
_ = Optional
