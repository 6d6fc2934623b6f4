"""The ``bwta`` command line (console script ``bwta = bwta_compiler.cli:main``).

Subcommands live in one table, ``SUBCOMMANDS``: name -> setup function.  A setup function gets
its argparse subparser, adds its arguments and sets ``func`` (the handler, ``args -> exit code``)
with ``parser.set_defaults(func=...)``.  The ONNX issue adds ``compile`` and ``bench`` by adding
entries to the table; handlers import what they need lazily so ``bwta --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

SetupFn = Callable[[argparse.ArgumentParser], None]


# **** bwta cache list | size | clear **********************************************************


def _cache(args: argparse.Namespace):
    from . import config
    from .runtime.cache import KernelCache

    cfg = config.resolve({"cache_dir": args.dir} if args.dir else None)
    return KernelCache(cfg.cache_dir, enabled=True, size_limit_mb=cfg.cache_size_mb)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _cache_list(args: argparse.Namespace) -> int:
    cache = _cache(args)
    rows = sorted(cache.entries(), key=lambda e: -e[3])
    print(f"{'last used':19s}  {'size':>10s}  {'artifact':40s}  digest")
    for directory, manifest, size, used in rows:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(used))
        print(f"{stamp}  {_human(size):>10s}  {manifest.get('artifact', '?'):40s}  {directory.name[:16]}")
    print(f"{len(rows)} entries, {_human(sum(r[2] for r in rows))} in {cache.root}")
    return 0


def _cache_size(args: argparse.Namespace) -> int:
    cache = _cache(args)
    total = cache.size_bytes()
    print(f"{_human(total)} ({total} bytes) in {cache.root}; limit {cache.size_limit >> 20} MiB")
    return 0


def _cache_clear(args: argparse.Namespace) -> int:
    cache = _cache(args)
    print(f"removed {cache.clear()} entries from {cache.root}")
    return 0


def setup_cache(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default="", help="cache root (default: BWTA_CACHE_DIR or the user cache dir)")
    actions = parser.add_subparsers(dest="action", required=True)
    for name, func, text in (("list", _cache_list, "list entries, most recently used first"),
                             ("size", _cache_size, "total size on disk"),
                             ("clear", _cache_clear, "remove every entry")):
        actions.add_parser(name, help=text).set_defaults(func=func)


def _onnx_subcommands() -> dict[str, tuple[SetupFn, str]]:
    # bwta_compiler.onnx.cli imports onnx only inside its handlers, so --help stays fast.
    from .onnx import cli as onnx_cli

    return {"compile": (onnx_cli.setup_compile, onnx_cli.COMPILE_HELP),
            "bench": (onnx_cli.setup_bench, onnx_cli.BENCH_HELP)}


SUBCOMMANDS: dict[str, tuple[SetupFn, str]] = {
    **_onnx_subcommands(),
    "cache": (setup_cache, "inspect or clear the compiled-kernel cache"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bwta", description="bwta-compiler: compile BWTA binarized transformers to low-bit kernels",
        epilog="examples:\n  bwta compile model.onnx --quantize --dump out/   # coverage report + kernel table\n"
               "  bwta bench model.onnx --quantize                # bwta vs the float model\n"
               "  bwta cache list                                 # what the kernel cache holds",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (setup, text) in SUBCOMMANDS.items():
        setup(sub.add_parser(name, help=text, description=text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
