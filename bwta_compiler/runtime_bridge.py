"""Binds a ``KernelChoice`` to a loaded kernel of its target (generated, compiled, cached).

The backend calls :func:`load` after the pass pipeline; a target whose runtime is missing
(no C compiler, no CUDA device, ...) yields ``None`` and a reason, and the fused op then runs
its reference implementation.  A kernel that fails to load (OSError, e.g. a corrupt cached
shared object) is rebuilt once; if it still cannot be loaded, only that op falls back.  Runtime
modules are imported lazily, so importing ``bwta_compiler`` never imports cuda-python.
"""

from __future__ import annotations

import logging
from typing import Any

from .config import Config
from .errors import CompileError
from .kernels import KernelChoice

log = logging.getLogger("bwta_compiler.runtime_bridge")
_SUFFIX = {"cpu": ".c", "cuda": ".cu"}


def source_suffix(target: str) -> str:
    return _SUFFIX.get(target, ".txt")


def _runtime(target: str):
    if target == "cpu":
        from .runtime import cpu as rt
    elif target == "cuda":
        from .runtime import cuda as rt
    else:
        raise ValueError(f"unknown target {target!r}")
    return rt


def _target_params(choice: KernelChoice, cfg: Config):
    if choice.target == "cpu":
        from .select_cpu import select_cpu_params as select
    else:
        from .select_cuda import select_cuda_params as select
    return select(choice.params, cfg)


def _load_or_rebuild(rt, params, cfg: Config):
    """``rt.load_kernel``; a cached artifact that fails to load (OSError: a bad ELF whose manifest
    still matches, a missing library) is rebuilt once, replacing the cache entry."""
    try:
        return rt.load_kernel(params, cfg)
    except OSError as e:
        if cfg.always_compile:  # it was just built: building again would not help
            raise
        log.warning("bwta kernel failed to load (%s: %s); rebuilding it", type(e).__name__, e)
    return rt.load_kernel(params, cfg.replace(always_compile=True))


def load(choice: KernelChoice, cfg: Config) -> tuple[Any | None, str]:
    """(loaded kernel, "") or (None, why not)."""
    try:
        rt = _runtime(choice.target)
    except ImportError as e:
        return None, f"{choice.target} code generation not available ({e})"
    if not rt.available():
        return None, f"{choice.target} target unavailable on this machine"
    try:
        params = _target_params(choice, cfg)
        kernel = _load_or_rebuild(rt, params, cfg)
    except CompileError as e:
        log.warning("bwta kernel compile failed: %s", e)
        return None, f"kernel compile failed: {str(e).splitlines()[0]}"
    except OSError as e:
        log.warning("bwta kernel for %s could not be loaded, even rebuilt: %s", choice.describe(), e)
        return None, f"kernel could not be loaded: {type(e).__name__}: {e}"
    except (ImportError, ValueError, NotImplementedError) as e:
        return None, f"no {choice.target} kernel for {choice.describe()}: {e}"
    if kernel is None:
        return None, f"{choice.target} compiler unavailable"
    return kernel, ""
