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


class _CacheDirError(Exception):
    """A cache root that cannot be used; ``_cache_command`` prints it as one ``bwta: ...`` line."""


def _cache(args: argparse.Namespace):
    import os

    from . import config
    from .runtime.cache import KernelCache

    try:
        cfg = config.resolve({"cache_dir": args.dir} if args.dir else None)
    except ValueError as e:
        raise _CacheDirError(e) from None
    root = cfg.cache_dir
    if os.path.exists(root) and not os.path.isdir(root):
        raise _CacheDirError(f"cache dir {root} is not a directory")
    return KernelCache(root, enabled=True, size_limit_mb=cfg.cache_size_mb)


def _cache_command(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``func`` with an unusable cache root (bad path, permission denied, ...) reported as one
    ``bwta: ...`` line on stderr and exit code 2, instead of a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except _CacheDirError as e:
            print(f"bwta: {e}", file=sys.stderr)
        except OSError as e:
            what = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)
            print(f"bwta: cannot use the kernel cache: {what}", file=sys.stderr)
        return 2

    run.__name__ = run.__qualname__ = func.__name__
    run.__doc__ = func.__doc__
    return run


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
        actions.add_parser(name, help=text).set_defaults(func=_cache_command(func))


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
