"""Host emulation of the generated CUDA kernels (tests only; see bwta_emu_primitives.h).

``emulated_kernel(params)`` renders the real kernel source, compiles it for the host with
``-DBWTA_HOST_EMULATION`` (the inline-PTX primitives of bwta_common.cuh come from the emulator,
everything else is the unchanged source), and returns the runtime's own LoadedKernel subclass
whose launches run in the emulator, so the host wrappers (packing calls, thresholds, grids,
epilogue arguments) are exercised too.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from bwta_compiler.runtime import compile_cuda
from bwta_compiler.runtime import cuda as rcuda

from bwta_compiler.fused_attention import FusedAttentionParams

EMU_DIR = Path(__file__).resolve().parent
_BUILD_DIR = Path(tempfile.mkdtemp(prefix="bwta-emu-"))
_LIBS: dict[str, ctypes.CDLL] = {}


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


def _signature(source: str, fname: str) -> list[str]:
    m = re.search(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\)\s*)?' + re.escape(fname) +
                  r"\((.*?)\)\s*\{", source, re.DOTALL)
    if not m:
        raise ValueError(f"kernel {fname} not found")
    types = []
    for param in m.group(1).split(","):
        param = " ".join(param.split())
        name = re.search(r"(\w+)$", param).group(1)
        types.append(param[: -len(name)].strip())
    return types


def build(ks: rcuda.KernelSource) -> ctypes.CDLL:
    tramp = ['#include "bwta_emu_primitives.h"']
    body = [ks.source]
    for fname in ks.functions.values():
        types = _signature(ks.source, fname)
        call = ", ".join(f"*({t} *)a[{i}]" for i, t in enumerate(types))
        body.append(f'extern "C" int emu_launch_{fname}(int gx, int gy, int gz, int bx, void **a) {{\n'
                    f"    return emu_run(gx, gy, gz, bx, [=] {{ {fname}({call}); }});\n}}\n")
    src = "\n".join(tramp + body)
    digest = hashlib.sha256(src.encode()).hexdigest()[:16]
    if digest in _LIBS:
        return _LIBS[digest]
    cpp = _BUILD_DIR / f"{ks.name}_{digest}.cpp"
    so = cpp.with_suffix(".so")
    cpp.write_text(src)
    cmd = [compiler(), "-std=c++17", "-O1", "-shared", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing",
           "-DBWTA_HOST_EMULATION", f"-I{compile_cuda.header_dir()}", f"-I{EMU_DIR}", "-w", "-o", str(so), str(cpp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"emulator build failed for {cpp}:\n{res.stderr[-4000:]}")
    lib = ctypes.CDLL(str(so))
    _LIBS[digest] = lib
    return lib


class EmuFunction:
    def __init__(self, lib: ctypes.CDLL, name: str) -> None:
        self.name = name
        self.fn = getattr(lib, f"emu_launch_{name}")
        self.fn.restype = ctypes.c_int
        self.fn.argtypes = [ctypes.c_int] * 4 + [ctypes.c_void_p]


def emu_launch(fn: EmuFunction, grid, block, args, device) -> None:
    if grid[0] == 0 or grid[1] == 0 or grid[2] == 0:
        return
    holders = [ctype(value) for value, ctype in args]
    arr = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
    rc = fn.fn(grid[0], grid[1], grid[2], block, ctypes.addressof(arr))
    if rc:
        raise RuntimeError(f"emulated kernel {fn.name} deadlocked (grid {grid}, block {block})")


def emulated_kernel(params):
    """The runtime's LoadedKernel for ``params``, with its functions running in the emulator."""
    ks = rcuda.kernel_source(params)
    lib = build(ks)
    if isinstance(params, FusedAttentionParams):
        cls = rcuda.AttentionKernel
    elif params.op == "qbmm" or params.variant in ("tt", "ut"):
        cls = rcuda.QbmmKernel
    else:
        cls = rcuda.LinearKernel
    k = cls.__new__(cls)
    k.params, k.name, k.source, k.arch = params, ks.name, ks.source, ks.arch
    k.key_lines, k.log, k.artifact_path, k.source_path, k.cache_hit, k.resources = [], "", "", "", False, {}
    k._fns = {role: EmuFunction(lib, fname) for role, fname in ks.functions.items()}
    return k
