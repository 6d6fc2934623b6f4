"""Compile generated CUDA C to a cubin with NVRTC (``cuda.bindings.nvrtc``; not cuda.core).

Works without a GPU or a driver: NVRTC emits a cubin for the exact arch (sm_80, sm_86, sm_89,
sm_90), ``-Xptxas=-v`` puts ptxas's register/spill report into the program log, and the program
is named after the dumped source file so profilers and debuggers find it.  This module and
:mod:`bwta_compiler.runtime.cuda` are the only ones that import cuda-python, lazily.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from bwta_compiler.errors import CompileError


@dataclass(frozen=True)
class CudaOptions:
    """Everything besides the source that changes the cubin (part of the cache key)."""

    arch: str = "sm_90"                    # exact SM: sm_80 | sm_86 | sm_89 | sm_90
    std: str = "c++17"
    lineinfo: bool = True
    ptxas_verbose: bool = True              # -Xptxas=-v: registers and spills into the log
    extra: tuple[str, ...] = field(default_factory=tuple)

    def flags(self, include_dirs: tuple[str, ...]) -> list[str]:
        if not re.fullmatch(r"sm_\d{2,3}a?", self.arch):
            raise ValueError(f"CUDA arch must look like sm_90, got {self.arch!r}")
        out = [f"--gpu-architecture={self.arch}", f"-std={self.std}", "-default-device"]
        if self.lineinfo:
            out.append("-lineinfo")
        if self.ptxas_verbose:
            out.append("-Xptxas=-v")
        out += [f"-I{d}" for d in include_dirs]
        out += list(self.extra)
        return out

    def key_string(self) -> str:
        return " ".join(self.flags(())) + f" nvrtc={nvrtc_version_string()}"


@dataclass(frozen=True)
class Resources:
    """ptxas's report for one kernel."""

    kernel: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    shared_bytes: int = 0


@dataclass
class CudaBuild:
    cubin: bytes
    log: str
    source_path: str
    resources: dict[str, Resources]


def header_dir() -> str:
    """The folder holding bwta_common.cuh (given to NVRTC with -I)."""
    return str(resources.files("bwta_compiler.templates") / "cuda")


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:  # pragma: no cover - depends on the environment
        try:  # cuda-python < 12.6 spelled it cuda.nvrtc
            from cuda import nvrtc  # type: ignore[no-redef]
            return nvrtc
        except ImportError:
            pass
        raise CompileError("the CUDA target needs cuda-bindings and nvidia-cuda-nvrtc "
                           "(pip install 'bwta-compiler[cuda]')", log=str(e)) from None
    return nvrtc


def nvrtc_available() -> bool:
    try:
        _nvrtc()
        nvrtc_version()
        return True
    except Exception:
        return False


@functools.lru_cache(maxsize=1)
def nvrtc_version() -> tuple[int, int]:
    nvrtc = _nvrtc()
    err, major, minor = nvrtc.nvrtcVersion()
    _check(nvrtc, err, "nvrtcVersion")
    return int(major), int(minor)


def nvrtc_version_string() -> str:
    try:
        major, minor = nvrtc_version()
        return f"{major}.{minor}"
    except Exception:
        return "unknown"


def _check(nvrtc, err, what: str, log: str = "", source_path: str | None = None) -> None:
    if int(err) != 0:
        _, msg = nvrtc.nvrtcGetErrorString(err)
        text = msg.decode() if isinstance(msg, (bytes, bytearray)) else str(msg)
        raise CompileError(f"NVRTC {what} failed: {text}", log=log, source_path=source_path)


def compile_source(source: str, source_path: str, options: CudaOptions,
                   include_dirs: tuple[str, ...] | None = None) -> CudaBuild:
    """Compile ``source`` (already dumped at ``source_path``) to a cubin for ``options.arch``."""
    nvrtc = _nvrtc()
    includes = tuple(include_dirs) if include_dirs is not None else (header_dir(),)
    name = os.path.basename(source_path).encode()
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), name, 0, [], [])
    _check(nvrtc, err, "nvrtcCreateProgram", source_path=source_path)
    try:
        opts = [o.encode() for o in options.flags(includes)]
        (res,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        log = _program_log(nvrtc, prog)
        if int(res) != 0:
            raise CompileError(f"NVRTC could not compile {os.path.basename(source_path)} for {options.arch}",
                               log=log, source_path=source_path)
        err, size = nvrtc.nvrtcGetCUBINSize(prog)
        _check(nvrtc, err, "nvrtcGetCUBINSize", log, source_path)
        cubin = b" " * size
        (err,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
        _check(nvrtc, err, "nvrtcGetCUBIN", log, source_path)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return CudaBuild(cubin=cubin, log=log, source_path=source_path, resources=parse_ptxas_log(log))


def _program_log(nvrtc, prog) -> str:
    err, n = nvrtc.nvrtcGetProgramLogSize(prog)
    if int(err) != 0 or n <= 1:
        return ""
    buf = b" " * n
    nvrtc.nvrtcGetProgramLog(prog, buf)
    return buf.rstrip(b"\x00 ").decode(errors="replace")


_FN = re.compile(r"Compiling entry function '([^']+)'|Function properties for (\S+)")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, Resources]:
    """Registers, spills and stack per kernel from ptxas ``-v`` output in the NVRTC log."""
    out: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = _FN.search(line)
        if m:
            current = m.group(1) or m.group(2)
            out.setdefault(current, {"registers": 0, "spill_stores": 0, "spill_loads": 0,
                                     "stack_frame": 0, "shared_bytes": 0})
            continue
        if current is None:
            continue
        if (m := _STACK.search(line)):
            out[current].update(stack_frame=int(m.group(1)), spill_stores=int(m.group(2)),
                                spill_loads=int(m.group(3)))
        if (m := _REGS.search(line)):
            out[current]["registers"] = int(m.group(1))
            if (s := _SMEM.search(line)):
                out[current]["shared_bytes"] = int(s.group(1))
    return {k: Resources(kernel=k, **v) for k, v in out.items()}


def dump_source(source: str, directory: str | Path, stem: str) -> str:
    """Write ``source`` to ``directory/stem.cu`` atomically and return the path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{stem}.cu"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".cu.tmp{os.getpid()}")
        tmp.write_text(source)
        os.replace(tmp, path)
    return str(path)
