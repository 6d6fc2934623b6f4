"""Compile generated C kernels with the system C compiler into shared objects (``make_so``).

gcc + ctypes builds a kernel in about 0.5 s, against ~27 s for ``torch.utils.cpp_extension``
(shared/notes/toolchain.md section 3), so the CPU target shells out to ``cc`` directly.

Threads (measured, AMD EPYC Zen3, 2 cores, torch 2.13 CPU wheel): the kernels use OpenMP.
torch's wheel bundles ``torch/lib/libgomp.so.1`` whose SONAME is the plain ``libgomp.so.1``; a
kernel built with ``-fopenmp`` records a NEEDED entry for that same SONAME, and the dynamic loader
reuses the copy torch already loaded, so there is exactly one OpenMP runtime (one thread pool) in
the process: after ``import torch`` and loading a kernel, ``/proc/self/maps`` lists one libgomp,
torch's.  Alternating ``F.linear`` (2048x2048, M = 64) and the kernel took 94.9 ms per pair
against 118.7 ms for the two measured apart (median of 30; no oversubscription penalty; the
machine was shared, so only the sign of the difference means much).  Rejected alternatives:
linking the system libgomp by path would give two pools that spin against each other; pthreads
would add a second pool of our own; running single-threaded leaves half the machine idle.
Caveat measured here too: on an oversubscribed machine (load 6 on 2 cores) every 2-thread
fork-join, torch's as well as ours, can wait a scheduler slice (10-20 ms) for a preempted
worker; the kernels therefore run tiny problems on one thread and hand out N blocks dynamically.  If a future wheel ships a hash-suffixed ``libgomp-<hash>.so.1`` (as some do), two
runtimes would spin against each other; :func:`openmp_link_flags` then links torch's copy by
path so the kernels still share torch's pool.  The thread count is passed on every call
(``torch.get_num_threads()`` by default), so the kernels follow ``torch.set_num_threads``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bwta_compiler.errors import CompileError

log = logging.getLogger("bwta_compiler.runtime.compile_cpu")

# Target flags each ISA path needs on top of -march=native (harmless when native has them,
# required when an ISA is forced for a compile-only check on a machine without it).
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "avx512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vpopcntdq", "-mf16c", "-mpopcnt"),
    "avx2": ("-mavx2", "-mf16c", "-mpopcnt"),
    "portable": (),
}

# -ffp-contract=off keeps the epilogue's multiply and add as two roundings (no FMA), exactly the
# eager reference.  -O3 -march=native measured best in the prototype (prefer-vector-width did not help).
BASE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=off", "-std=gnu11")


@dataclass(frozen=True)
class CompileOptions:
    """Everything on the compiler command line except file names (part of the cache key)."""

    isa: str
    flags: tuple[str, ...]

    def text(self) -> str:
        return " ".join(self.flags)

    def hash(self) -> str:
        return hashlib.sha256(self.text().encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def find_compiler() -> str | None:
    """The C compiler to use: ``$CC``, else ``cc``, ``gcc`` or ``clang`` on PATH, else None."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


_warned_missing = False


def available() -> bool:
    """True when a C compiler exists; without one, say so once (callers use the reference ops)."""
    global _warned_missing
    if find_compiler() is not None:
        return True
    if not _warned_missing:
        log.warning("bwta: no C compiler found (set CC or install cc); CPU kernels run the eager reference ops")
        _warned_missing = True
    return False


@functools.lru_cache(maxsize=1)
def compiler_version() -> str:
    """First line of ``cc --version`` (part of the cache key: a new compiler rebuilds kernels)."""
    cc = find_compiler()
    if cc is None:
        return "none"
    out = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False)
    return f"{cc}: {(out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else 'unknown'}"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """CPU feature flags of this machine (from /proc/cpuinfo; empty where it does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def detect_isa() -> str:
    """Best ISA path this CPU runs: avx512 (needs VPOPCNTDQ + BW), avx2, else portable."""
    flags = cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vpopcntdq", "f16c"} <= flags:
        return "avx512"
    if {"avx2", "f16c", "popcnt"} <= flags:
        return "avx2"
    return "portable"


def isa_supported(isa: str) -> bool:
    """Whether kernels built for ``isa`` run on this CPU."""
    order = ["portable", "avx2", "avx512"]
    return order.index(isa) <= order.index(detect_isa())


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


@functools.lru_cache(maxsize=1)
def arch_string() -> str:
    """CPU model plus a hash of its feature flags: -march=native makes the binary CPU-specific."""
    flags = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]
    return f"{cpu_model()} flags:{flags}"


@functools.lru_cache(maxsize=1)
def openmp_link_flags() -> tuple[str, ...]:
    """Link flags that make the kernels share torch's OpenMP runtime (see the module docstring)."""
    try:
        import torch

        lib = Path(torch.__file__).parent / "lib"
    except ImportError:
        return ()
    hashed = sorted(p for p in lib.glob("libgomp*.so*") if p.name != "libgomp.so.1")
    if hashed and not (lib / "libgomp.so.1").exists():
        return (str(hashed[0]), f"-Wl,-rpath,{lib}")
    return ()


def compile_options(isa: str) -> CompileOptions:
    """Flags for one ISA path; the include dir of bwta_common.h is added at build time."""
    if isa not in ISA_FLAGS:
        raise ValueError(f"unknown CPU isa {isa!r}; expected one of {sorted(ISA_FLAGS)}")
    return CompileOptions(isa=isa, flags=BASE_FLAGS + ISA_FLAGS[isa] + openmp_link_flags())


def include_dir() -> Path:
    """Directory holding bwta_common.h (the installed templates/cpu package)."""
    from importlib import resources

    return Path(str(resources.files("bwta_compiler.templates") / "cpu"))


def make_so(source_path: Path, artifact_path: Path, options: CompileOptions) -> str:
    """Compile ``source_path`` into the shared object ``artifact_path``; returns the compiler log.

    Raises :class:`CompileError` carrying the log and the source path when the compiler fails.
    """
    cc = find_compiler()
    if cc is None:
        raise CompileError("no C compiler found (set CC or install cc)", source_path=str(source_path))
    # The source goes first so library flags (torch's libgomp, if any) follow the object that needs them.
    cmd = [cc, str(source_path), *options.flags, f"-I{include_dir()}", "-o", str(artifact_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log_text = " ".join(cmd) + "\n" + proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise CompileError(f"C compiler failed with exit code {proc.returncode}", log=log_text,
                           source_path=str(source_path))
    return log_text
