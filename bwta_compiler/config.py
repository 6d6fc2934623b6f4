"""Runtime configuration: every flag typed, defaulted, commented, and overridable.

Precedence: ``torch.compile(..., options={...})`` > ``BWTA_<NAME>`` environment variable >
the default written here.  Unknown options are an error listing the valid ones.
``config.patch(**kw)`` overrides flags for a block of code (tests use it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "bwta_compiler")


@dataclass(frozen=True)
class Config:
    # Where fused low-bit ops run: "auto" picks cuda for CUDA tensors and cpu otherwise.
    target: Literal["auto", "cpu", "cuda"] = "auto"
    # How the parts of a graph that bwta does not handle run: "inductor" (fastest) or "eager".
    fallback: Literal["inductor", "eager"] = "inductor"
    # Raise one error listing every MatMul that could not run in low bit, instead of a report.
    strict: bool = False
    # Directory for the debug dump (graphs after each pass, kernel table, kernel sources).
    debug_dir: str = ""
    # Root of the on-disk kernel cache (created with owner-only permissions).
    cache_dir: str = field(default_factory=_default_cache_dir)
    # Use the on-disk kernel cache at all (BWTA_CACHE=0 disables it, like tinygrad's CCACHE).
    cache: bool = True
    # Size limit of the on-disk cache in megabytes; least recently used entries go first.
    cache_size_mb: int = 512
    # Rebuild kernels even when the cache has them.
    always_compile: bool = False
    # Directory of hand-edited kernel sources that replace rendered ones (keyed by source hash).
    kernel_override_dir: str = ""
    # Run generated kernels (True) or the eager reference ops (False) for fused nodes.
    codegen: bool = True
    # Check IR invariants after every pass.
    verify: bool = True
    # K is padded to a multiple of this many bits in packed formats.
    pad_bits: int = 64
    # Threads for the CPU kernels; 0 means torch.get_num_threads().
    num_threads: int = 0
    # CPU instruction set for generated kernels: "auto" detects, or force avx512 / avx2 / portable.
    cpu_isa: Literal["auto", "avx512", "avx2", "portable"] = "auto"

    def replace(self, **kw: Any) -> Config:
        return dataclasses.replace(self, **kw)


# Fields that change generated programs: they feed the kernel cache key.
CODEGEN_FIELDS = ("pad_bits", "cpu_isa")

_FIELD_TYPES = {f.name: f.type for f in fields(Config)}
_overrides: dict[str, Any] = {}


def option_names() -> list[str]:
    return sorted(_FIELD_TYPES)


def _parse(name: str, raw: Any) -> Any:
    default = getattr(Config(), name)
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"bwta option {name!r} expects a boolean, got {raw!r}")
    if isinstance(default, int):
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"bwta option {name!r} expects an integer, got {raw!r}") from None
    value = str(raw) if raw is not None else ""
    allowed = _literal_choices(name)
    if allowed and value not in allowed:
        raise ValueError(f"bwta option {name!r} must be one of {allowed}, got {value!r}")
    return value


def _literal_choices(name: str) -> tuple[str, ...]:
    text = str(_FIELD_TYPES[name])
    if not text.startswith("Literal["):
        return ()
    return tuple(part.strip().strip("'\"") for part in text[len("Literal["):-1].split(","))


def _check_names(options: dict[str, Any], where: str) -> None:
    unknown = sorted(set(options) - set(_FIELD_TYPES))
    if unknown:
        raise ValueError(f"unknown bwta option(s) {unknown} in {where}; valid options: {option_names()}")


def from_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    env = os.environ if environ is None else environ
    out = {}
    for name in _FIELD_TYPES:
        key = "BWTA_" + name.upper()
        if key in env:
            out[name] = _parse(name, env[key])
    return out


def resolve(options: dict[str, Any] | None = None) -> Config:
    """The effective config: options > BWTA_* environment > patch() overrides > defaults."""
    options = dict(options or {})
    _check_names(options, "options")
    values: dict[str, Any] = dict(_overrides)
    values.update(from_env())
    values.update({k: _parse(k, v) for k, v in options.items()})
    return Config(**values)


@contextlib.contextmanager
def patch(**kw: Any) -> Iterator[None]:
    """Temporarily override flags (below options and environment variables in precedence)."""
    _check_names(kw, "config.patch")
    saved = dict(_overrides)
    _overrides.update({k: _parse(k, v) for k, v in kw.items()})
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)
