"""CUDA target: render -> NVRTC cubin (cached) -> cuModuleLoadData -> cuLaunchKernel on torch's stream.

The only module besides :mod:`compile_cuda` that imports cuda-python, and only inside functions:
importing it (or ``bwta_compiler``) never needs a driver.  Source generation (:func:`kernel_source`)
and compilation (:func:`compile_params`) work without a GPU; :func:`load_kernel` needs one.

``load_kernel(params, cfg) -> LoadedKernel``; the object is callable with the kernel-registry
signature of the op it serves:

* ``GemmParams(op="linear")``: ``fn(x, s, b, w_packed, scale, bias, out_dtype) -> [..., N]``
* ``GemmParams(op="qbmm")``:   ``fn(a, a_s, a_b, b, b_s, b_b, scale, bias, out_dtype) -> [..., M, N]``
* ``FusedAttentionParams``:    ``fn(q, k, v, sq, sk, sv, sp, bp, scale=None, is_causal=False,
  key_keep=None, out_dtype=None) -> [B, H, T, Dv]`` (equals ``fused_attention_reference``)
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from bwta_compiler import codegen, formats
from bwta_compiler.fused_attention import FusedAttentionParams, exp_table, score_scale
from bwta_compiler.kernels import GemmParams
from bwta_compiler.ops import bool_thresholds, ternary_thresholds
from bwta_compiler.tensor_stamp import StampedMemo

from . import compile_cuda

log = logging.getLogger("bwta_compiler.runtime.cuda")

DT_CODE = {"float32": 0, "float16": 1, "bfloat16": 2}
ACT_CODE = {"ternary": 0, "bool": 1, "binary": 2}
TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAME = {v: k for k, v in TORCH_DTYPE.items()}
ESIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
PLANES = {"ternary": 2, "bool": 1, "binary": 1}
SMEM_LIMIT = 48 * 1024
# Tests only (tests/emu): run the kernels' host emulation on CPU tensors instead of the driver.
_HOST_EMULATION = False

Params = Union[GemmParams, FusedAttentionParams]


# ---- availability -----------------------------------------------------------------------------

_AVAILABLE: bool | None = None
_AVAIL_LOCK = threading.Lock()


def available() -> bool:
    """True when a CUDA device, a driver and cuda-python are all usable (checked once).

    Without a driver ``driver.cuInit(0)`` raises RuntimeError (cuda-bindings 13.0: "Failed to
    dlopen libcuda.so.1"); that is caught and "no CUDA device" is logged once."""
    global _AVAILABLE
    with _AVAIL_LOCK:
        if _AVAILABLE is None:
            _AVAILABLE = _probe()
        return _AVAILABLE


def _probe() -> bool:
    try:
        driver = _driver()
    except ImportError as e:
        log.warning("bwta: no CUDA device (cuda-bindings not installed: %s)", e)
        return False
    try:
        (err,) = driver.cuInit(0)
    except RuntimeError as e:
        log.warning("bwta: no CUDA device (%s)", e)
        return False
    if int(err) != 0:
        log.warning("bwta: no CUDA device (cuInit returned %s)", err)
        return False
    if not torch.cuda.is_available():
        log.warning("bwta: no CUDA device visible to torch")
        return False
    return True


def device_arch(device: int | None = None) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


# ---- source generation (no GPU needed) --------------------------------------------------------

@dataclass(frozen=True)
class KernelSource:
    name: str                      # stem of the dumped file and the cache artifact
    source: str
    functions: dict[str, str]      # role -> extern "C" function name
    arch: str


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(repr(obj).encode()).hexdigest()[:10]


def _arch_of(isa: str) -> str:
    return isa if isa.startswith("sm_") else "sm_90"


def _kwp(k: int) -> int:
    """int32 words per plane of an operand packed by pack_act (K padded to 128 bits)."""
    return -(-k // 128) * 4


def _check_linear(p: GemmParams) -> None:
    if p.variant not in ("bt", "bb") or p.b_act != "binary":
        raise ValueError(f"CUDA linear kernels take binary weights (variant bt/bb), got {p.variant}/{p.b_act}")
    if p.a_act not in ACT_CODE or p.in_dtype not in DT_CODE or p.out_dtype not in DT_CODE:
        raise ValueError(f"unsupported act/dtype in {p}")
    if p.kw != formats.num_words(p.k, p.pad_bits):
        raise ValueError(f"kw={p.kw} does not hold K={p.k} at pad_bits={p.pad_bits}")
    if p.impl == "mma":
        if p.tile_m % (8 * p.warps_m) or p.tile_n % (8 * p.warps_n):
            raise ValueError(f"mma tiles must split into 8x8 warp tiles: tile {p.tile_m}x{p.tile_n}, "
                             f"warps {p.warps_m}x{p.warps_n}")
    elif p.impl == "popc":
        if not 1 <= p.tile_m <= 32 or p.tile_n % p.warps_n:
            raise ValueError(f"popc tiles: 1 <= tile_m <= 32 and tile_n divisible by warps_n, got {p}")
    else:
        raise ValueError(f"impl must be 'mma' or 'popc', got {p.impl!r}")


def linear_source(p: GemmParams) -> KernelSource:
    _check_linear(p)
    template = f"linear_{p.impl}"
    name = f"bwta_{template}_{p.a_act}_k{p.k}_n{p.n}_{p.in_dtype}_{p.out_dtype}_{_short_hash(p)}"
    ksteps = -(-p.kw // 4)
    planes_bytes = 4 * (1 if p.a_act == "bool" else 2)
    chunk_words = max(1, min(p.kw, (32 * 1024) // (p.tile_m * planes_bytes)))
    extra = dict(kernel_name=name, act_code=ACT_CODE[p.a_act], dt_code=DT_CODE[p.in_dtype],
                 ot_code=DT_CODE[p.out_dtype], vec=int((p.k * ESIZE[p.in_dtype]) % 16 == 0),
                 ksteps=ksteps, stage_ksteps=min(4, ksteps), kw4=int(p.kw % 4 == 0), chunk_words=chunk_words)
    src = codegen.render("cuda", template, p, **extra)
    return KernelSource(name, src, {"main": name}, _arch_of(p.isa))


def _pack_source(name: str, act: str, in_dtype: str, transposed: bool, perm: bool, k_static: int,
                 isa: str) -> str:
    vec = int(k_static > 0 and (k_static * ESIZE[in_dtype]) % 16 == 0 and not transposed)
    values = dict(kernel_name=name, act=act, in_dtype=in_dtype, act_code=ACT_CODE[act], dt_code=DT_CODE[in_dtype],
                  vec=vec, planes=PLANES[act], transposed=int(transposed), perm=int(perm))
    return codegen.environment("cuda").get_template("pack_act.cu.jinja").render(**values)


def qbmm_source(p: GemmParams) -> KernelSource:
    acts = {"tt": ("ternary", "ternary"), "ut": ("bool", "ternary"), "bb": ("binary", "binary")}
    if p.variant not in acts or acts[p.variant] != (p.a_act, p.b_act):
        raise ValueError(f"qbmm variant {p.variant} needs acts {acts.get(p.variant)}, got ({p.a_act}, {p.b_act})")
    if p.in_dtype not in DT_CODE or p.out_dtype not in DT_CODE:
        raise ValueError(f"CUDA qbmm supports fp32/fp16/bf16, got in={p.in_dtype} out={p.out_dtype}")
    if p.impl not in ("mma", "popc"):
        raise ValueError(f"impl must be 'mma' or 'popc', got {p.impl!r}")
    if p.impl == "mma" and (p.tile_m % (8 * p.warps_m) or p.tile_n % (8 * p.warps_n)):
        raise ValueError(f"mma tiles must split into 8x8 warp tiles: {p}")
    if p.impl == "popc" and p.tile_m * p.tile_n > 1024:
        raise ValueError(f"popc qbmm: tile_m * tile_n threads must be <= 1024, got {p.tile_m}x{p.tile_n}")
    h = _short_hash(p)
    base = f"bwta_qbmm_{p.variant}_{p.impl}_k{p.k}_{p.in_dtype}_{p.out_dtype}_{h}"
    fa, fb, fg = f"{base}_pack_a", f"{base}_pack_b", base
    parts = [
        _pack_source(fa, p.a_act, p.in_dtype, False, False, p.k, p.isa),
        _pack_source(fb, p.b_act, p.in_dtype, p.b_kn, False, p.k, p.isa),
        codegen.render("cuda", "qbmm", p, kernel_name=fg, ot_code=DT_CODE[p.out_dtype], kwp=_kwp(p.k),
                       planes_a=PLANES[p.a_act], planes_b=PLANES[p.b_act]),
    ]
    return KernelSource(base, "\n".join(parts), {"pack_a": fa, "pack_b": fb, "gemm": fg}, _arch_of(p.isa))


def attention_warps(fp: FusedAttentionParams) -> int:
    if fp.warps:
        return fp.warps
    per_warp = 16 * (2 * fp.head_dim + 1) * 4 + 16 * 8
    return max(1, min(4, (SMEM_LIMIT - 1024) // per_warp))


def attention_source(fp: FusedAttentionParams) -> KernelSource:
    if fp.in_dtype not in DT_CODE or fp.out_dtype not in DT_CODE:
        raise ValueError(f"unsupported dtypes in {fp}")
    warps = attention_warps(fp)
    if warps * (16 * (2 * fp.head_dim + 1) * 4 + 128) > SMEM_LIMIT:
        raise ValueError(f"fused attention: head dim {fp.head_dim} needs more than 48 KB of histogram")
    h = _short_hash(fp)
    base = f"bwta_attn_d{fp.head_dim}_{'causal_' if fp.causal else ''}{fp.in_dtype}_{fp.out_dtype}_{h}"
    fq, fv, ff = f"{base}_pack_qk", f"{base}_pack_v", base
    values = dict(kernel_name=ff, ot_code=DT_CODE[fp.out_dtype], k=fp.head_dim, dwp=_kwp(fp.head_dim),
                  dv=fp.v_dim, warps_n=warps, causal=fp.causal, has_mask=fp.has_mask, out_dtype=fp.out_dtype,
                  isa=fp.isa)
    parts = [
        _pack_source(fq, "ternary", fp.in_dtype, False, False, fp.head_dim, fp.isa),
        _pack_source(fv, "ternary", fp.in_dtype, True, True, 0, fp.isa),
        codegen.environment("cuda").get_template("attn_fused.cu.jinja").render(**values),
    ]
    return KernelSource(base, "\n".join(parts), {"pack_qk": fq, "pack_v": fv, "attn": ff}, _arch_of(fp.isa))


def kernel_source(params: Params) -> KernelSource:
    import bwta_compiler.templates.cuda  # noqa: F401  (registers the CUDA templates)

    if isinstance(params, FusedAttentionParams):
        return attention_source(params)
    if getattr(params, "op", "linear") == "qbmm" or params.variant in ("tt", "ut"):
        return qbmm_source(params)
    return linear_source(params)


# ---- compile + cache (no GPU needed) ----------------------------------------------------------

@dataclass
class CompiledKernel:
    ks: KernelSource
    cubin: bytes
    log: str
    artifact_path: str
    source_path: str
    key_lines: list[str]
    cache_hit: bool
    resources: dict[str, compile_cuda.Resources] = field(default_factory=dict)


def compile_params(params: Params, cfg=None, arch: str | None = None, cache=None) -> CompiledKernel:
    """Render and compile (through the kernel cache) for ``arch`` (default: the params' isa)."""
    from bwta_compiler.runtime.cache import CacheKey, default_cache

    from bwta_compiler import config as _config

    cfg = cfg or _config.resolve()
    ks = kernel_source(params)
    arch = arch or ks.arch
    opts = compile_cuda.CudaOptions(arch=arch)
    key = CacheKey(target="cuda", source_sha256=hashlib.sha256(ks.source.encode()).hexdigest(),
                   options=opts.key_string(), arch=arch, compiler=f"nvrtc-{compile_cuda.nvrtc_version_string()}",
                   bwta=codegen.bwta_key())

    def build(source_path: Path, artifact_path: Path) -> str:
        res = compile_cuda.compile_source(ks.source, str(source_path), opts)
        artifact_path.write_bytes(res.cubin)
        return res.log

    entry = (cache or default_cache(cfg)).lookup_or_build(key, ks.source, f"{ks.name}.cubin", build,
                                               force=bool(getattr(cfg, "always_compile", False)))
    cubin = Path(entry.artifact_path).read_bytes()
    return CompiledKernel(ks, cubin, entry.log, str(entry.artifact_path), str(entry.source_path),
                          key.debug_lines(), entry.hit, compile_cuda.parse_ptxas_log(entry.log))


# ---- driver: modules, launches ----------------------------------------------------------------

def _driver():
    try:
        from cuda.bindings import driver
    except ImportError:  # cuda-python < 12.6
        from cuda import cuda as driver  # type: ignore[no-redef]
    return driver


def _check(err, what: str) -> None:
    if int(err) != 0:
        driver = _driver()
        _, msg = driver.cuGetErrorString(err)
        raise RuntimeError(f"bwta CUDA: {what} failed: {msg.decode() if isinstance(msg, bytes) else msg}")


_VOIDP, _INT, _FLOAT = ctypes.c_void_p, ctypes.c_int, ctypes.c_float


def _ptr(t: torch.Tensor | None) -> tuple[int, type]:
    return (t.data_ptr() if t is not None else 0), _VOIDP


def _launch(fn, grid: tuple[int, int, int], block: int, args: list[tuple[Any, type]], device: torch.device) -> None:
    if grid[0] == 0 or grid[1] == 0 or grid[2] == 0:
        return
    driver = _driver()
    holders = [ctype(value) for value, ctype in args]
    arr = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
    stream = torch.cuda.current_stream(device).cuda_stream
    (err,) = driver.cuLaunchKernel(fn, grid[0], grid[1], grid[2], block, 1, 1, 0, driver.CUstream(stream),
                                   ctypes.addressof(arr), 0)
    _check(err, "cuLaunchKernel")


class _Thresholds:
    """Device-side one-element thresholds, cached per scale tensor while it is unchanged (see
    StampedMemo): no host sync."""

    def __init__(self) -> None:
        self._cache = StampedMemo(512)

    def get(self, act: str, s: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
        key = (act, dtype, str(device))
        hit = self._cache.get(key, (s, b))
        if hit is not StampedMemo.MISS:
            return hit
        if act == "ternary":
            t = ternary_thresholds(s, 1, dtype)
        elif act == "bool":
            t = bool_thresholds(s, b, 1, dtype)
        else:
            t = torch.zeros(1, device=s.device)
        t = t.float().reshape(1).to(device).contiguous()
        self._cache.put(key, (s, b), t)
        return t


_THRESHOLDS = _Thresholds()


def _f32(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.detach().to(device=device, dtype=torch.float32).reshape(-1).contiguous()


def _aligned(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


class LoadedKernel:
    """A compiled, loaded kernel: callable with the registry signature of its op."""

    def __init__(self, params: Params, ck: CompiledKernel) -> None:
        self.params = params
        self.name = ck.ks.name
        self.source = ck.ks.source
        self.key_lines = ck.key_lines
        self.log = ck.log
        self.artifact_path = ck.artifact_path
        self.source_path = ck.source_path
        self.cache_hit = ck.cache_hit
        self.resources = ck.resources
        self.arch = ck.ks.arch
        driver = _driver()
        err, self._module = driver.cuModuleLoadData(ck.cubin)
        _check(err, f"cuModuleLoadData({self.name})")
        self._fns = {}
        for role, fname in ck.ks.functions.items():
            err, fn = driver.cuModuleGetFunction(self._module, fname.encode())
            _check(err, f"cuModuleGetFunction({fname})")
            self._fns[role] = fn

    def __repr__(self) -> str:
        return f"<LoadedKernel {self.name} {self.arch} cache_hit={self.cache_hit}>"


class LinearKernel(LoadedKernel):
    def __call__(self, x, s, b, w_packed, scale, bias, out_dtype):
        p: GemmParams = self.params
        if not x.is_cuda and not _HOST_EMULATION:
            raise ValueError(f"{self.name}: x must be a CUDA tensor, got {x.device}")
        if DTYPE_NAME.get(x.dtype) != p.in_dtype or x.shape[-1] != p.k:
            raise ValueError(f"{self.name}: specialised for x [..., {p.k}] {p.in_dtype}, got {tuple(x.shape)} {x.dtype}")
        want_out = out_dtype or torch.float32
        if DTYPE_NAME.get(want_out) != p.out_dtype:
            raise ValueError(f"{self.name}: specialised for out dtype {p.out_dtype}, asked for {want_out}")
        if (scale is not None) != p.has_scale or (bias is not None) != p.has_bias:
            raise ValueError(f"{self.name}: specialised for scale={p.has_scale} bias={p.has_bias}")
        n = w_packed.shape[0]
        if w_packed.dtype != torch.int32 or w_packed.shape[-1] != p.kw or (p.n and n != p.n):
            raise ValueError(f"{self.name}: w_packed must be int32 [{p.n or 'N'}, {p.kw}], got {tuple(w_packed.shape)}")
        dev = x.device
        x2 = _aligned(x.reshape(-1, p.k))
        m = x2.shape[0]
        w = w_packed.contiguous()
        sc, bi = _f32(scale, dev), _f32(bias, dev)
        if sc is not None and p.scale_per_col and sc.numel() != n:
            sc = sc.expand(n).contiguous()
        if bi is not None and bi.numel() != n:
            bi = bi.expand(n).contiguous()
        t = _THRESHOLDS.get(p.a_act, s, b, x.dtype, dev)
        out = torch.empty((m, n), dtype=want_out, device=dev)
        threads = 32 * (p.warps_m * p.warps_n if p.impl == "mma" else p.warps_n)
        grid = (-(-n // p.tile_n), -(-m // p.tile_m), 1)
        _launch(self._fns["main"], grid, threads,
                [_ptr(x2), _ptr(w), _ptr(sc), _ptr(bi), _ptr(out), (m, _INT), (n, _INT), _ptr(t)], dev)
        return out.reshape(*x.shape[:-1], n)


def _pack(fn, x3: torch.Tensor, rows: int, k: int, kwp: int, planes: int, t: torch.Tensor) -> torch.Tensor:
    bsz = x3.shape[0]
    out = torch.empty((bsz, rows, planes, kwp), dtype=torch.int32, device=x3.device)
    total = bsz * rows * kwp
    blocks = max(1, min(-(-total // 256), 65535 * 4))
    _launch(fn, (blocks, 1, 1), 256, [_ptr(x3), _ptr(out), (bsz, _INT), (rows, _INT), (k, _INT), (kwp, _INT),
                                      _ptr(t)], x3.device)
    return out


class QbmmKernel(LoadedKernel):
    def __call__(self, a, a_s, a_b, b, b_s, b_b, scale, bias, out_dtype):
        p: GemmParams = self.params
        want_out = out_dtype or torch.float32
        for name, t in (("a", a), ("b", b)):
            if (not t.is_cuda and not _HOST_EMULATION) or DTYPE_NAME.get(t.dtype) != p.in_dtype:
                raise ValueError(f"{self.name}: {name} must be a CUDA {p.in_dtype} tensor, got {t.dtype} on {t.device}")
        if DTYPE_NAME.get(want_out) != p.out_dtype:
            raise ValueError(f"{self.name}: specialised for out dtype {p.out_dtype}, asked for {want_out}")
        k = a.shape[-1]
        kb = b.shape[-2] if p.b_kn else b.shape[-1]
        if k != p.k or kb != p.k:
            raise ValueError(f"{self.name}: specialised for K={p.k}, got a {tuple(a.shape)} b {tuple(b.shape)}")
        dev = a.device
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        m = a.shape[-2]
        n = b.shape[-1] if p.b_kn else b.shape[-2]
        a3 = _aligned(a.expand(*batch, *a.shape[-2:]).reshape(-1, m, k))
        b3 = _aligned(b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:]))
        bt = a3.shape[0]
        kwp = _kwp(k)
        ta = _THRESHOLDS.get(p.a_act, a_s, a_b, a.dtype, dev)
        tb = _THRESHOLDS.get(p.b_act, b_s, b_b, b.dtype, dev)
        ap = _pack(self._fns["pack_a"], a3, m, k, kwp, PLANES[p.a_act], ta)
        bp = _pack(self._fns["pack_b"], b3, n, k, kwp, PLANES[p.b_act], tb)
        sc, bi = _f32(scale, dev), _f32(bias, dev)
        if sc is not None and p.scale_per_col and sc.numel() != n:
            sc = sc.expand(n).contiguous()
        if bi is not None and bi.numel() != n:
            bi = bi.expand(n).contiguous()
        out = torch.empty((bt, m, n), dtype=want_out, device=dev)
        threads = 32 * p.warps_m * p.warps_n if p.impl == "mma" else p.tile_m * p.tile_n
        grid = (-(-n // p.tile_n), -(-m // p.tile_m), bt)
        _launch(self._fns["gemm"], grid, threads,
                [_ptr(ap), _ptr(bp), _ptr(sc), _ptr(bi), _ptr(out), (m, _INT), (n, _INT)], dev)
        return out.reshape(*batch, m, n)


class AttentionKernel(LoadedKernel):
    def __call__(self, q, k, v, sq, sk, sv, sp, bp, scale=None, is_causal=False, key_keep=None, out_dtype=None):
        fp: FusedAttentionParams = self.params
        if bool(is_causal) != fp.causal or (key_keep is not None) != fp.has_mask:
            raise ValueError(f"{self.name}: specialised for causal={fp.causal} key mask={fp.has_mask}")
        bsz, h, t, d = q.shape
        hkv, s, dv = k.shape[1], k.shape[2], v.shape[3]
        if d != fp.head_dim or dv != fp.v_dim or k.shape[-1] != d or v.shape[2] != s or h % hkv or v.shape[1] != hkv:
            raise ValueError(f"{self.name}: shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)} "
                             f"do not fit head dim {fp.head_dim}/{fp.v_dim}")
        want_out = out_dtype or q.dtype
        if DTYPE_NAME.get(want_out) != fp.out_dtype:
            raise ValueError(f"{self.name}: specialised for out dtype {fp.out_dtype}, asked for {want_out}")
        for name, x in (("q", q), ("k", k), ("v", v)):
            if (not x.is_cuda and not _HOST_EMULATION) or DTYPE_NAME.get(x.dtype) != fp.in_dtype:
                raise ValueError(f"{self.name}: {name} must be a CUDA {fp.in_dtype} tensor")
        dev = q.device
        scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        dwp = _kwp(d)
        swp = _kwp(s)
        tq = _THRESHOLDS.get("ternary", sq, None, q.dtype, dev)
        tk = _THRESHOLDS.get("ternary", sk, None, k.dtype, dev)
        tv = _THRESHOLDS.get("ternary", sv, None, v.dtype, dev)
        qp = _pack(self._fns["pack_qk"], _aligned(q.reshape(bsz * h, t, d)), t, d, dwp, 2, tq)
        kp = _pack(self._fns["pack_qk"], _aligned(k.reshape(bsz * hkv, s, d)), s, d, dwp, 2, tk)
        vp = _pack(self._fns["pack_v"], _aligned(v.reshape(bsz * hkv, s, dv)), dv, s, swp, 2, tv)
        etab = exp_table(score_scale(sq, sk, scale).to(dev), d).contiguous()
        fparams = torch.stack([bool_thresholds(sp, bp, 1, torch.float32).reshape(()).to(dev),
                               (sp.detach().float().reshape(()) * sv.detach().float().reshape(())).to(dev)])
        keep = None
        if key_keep is not None:
            keep = key_keep.to(device=dev, dtype=torch.uint8).reshape(bsz, s).contiguous()
        out = torch.empty((bsz, h, t, dv), dtype=want_out, device=dev)
        warps = attention_warps(fp)
        grid = (-(-t // (16 * warps)), bsz * h, 1)
        _launch(self._fns["attn"], grid, 32 * warps,
                [_ptr(qp), _ptr(kp), _ptr(vp), _ptr(etab), _ptr(keep), _ptr(out), (h, _INT), (hkv, _INT),
                 (t, _INT), (s, _INT), (swp, _INT), _ptr(fparams)], dev)
        return out


class LinearDispatch:
    """``impl="auto"`` linear: one compiled variant per table row, chosen by each call's M.

    Attributes (name, source, log, ...) describe the variant used last (initially the large-M
    tensor-core one, compiled eagerly so compile errors surface at load time)."""

    def __init__(self, params: GemmParams, cfg) -> None:
        self.params = params
        self._cfg = cfg
        self._variants: dict[GemmParams, LinearKernel] = {}
        self._primary = self._variant(1 << 20)

    def _variant(self, m: int) -> LinearKernel:
        from bwta_compiler.select_cuda import linear_params

        p = linear_params(self.params, max(1, m), self.params.isa)
        k = self._variants.get(p)
        if k is None:
            k = _load(p, self._cfg)
            self._variants[p] = k
        return k

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._primary, name)

    def __call__(self, x, s, b, w_packed, scale, bias, out_dtype):
        m = x.numel() // max(1, x.shape[-1])
        return self._variant(m)(x, s, b, w_packed, scale, bias, out_dtype)

    def __repr__(self) -> str:
        return f"<LinearDispatch {self.params.a_act} K={self.params.k} N={self.params.n} variants={len(self._variants)}>"


_LOADED: dict[tuple, Any] = {}
_LOAD_LOCK = threading.RLock()


def load_kernel(params: Params, cfg=None) -> LoadedKernel:
    """Compile (cached) and load the kernel for ``params`` on the current device.

    The params' ``isa`` is replaced by the device's arch.  ``GemmParams(impl="auto")`` (linear)
    returns a :class:`LinearDispatch` choosing the variant per call's M."""
    if not available():
        raise RuntimeError("bwta CUDA: no CUDA device")
    arch = device_arch(torch.cuda.current_device())
    params = params.replace(isa=arch)
    if isinstance(params, GemmParams) and params.impl == "auto":
        key = (torch.cuda.current_device(), params)
        with _LOAD_LOCK:
            k = _LOADED.get(key)
            if k is None:
                k = _LOADED[key] = LinearDispatch(params, cfg)
            return k
    return _load(params, cfg)


def _load(params: Params, cfg) -> LoadedKernel:
    device = torch.cuda.current_device()
    if isinstance(params, FusedAttentionParams):
        cls = AttentionKernel
    elif getattr(params, "op", "linear") == "qbmm" or params.variant in ("tt", "ut"):
        cls = QbmmKernel
    else:
        cls = LinearKernel
    key = (device, params)
    with _LOAD_LOCK:
        k = _LOADED.get(key)
        if k is None:
            with torch.cuda.device(device):
                torch.empty(1, device="cuda")  # torch's primary context is current on this thread
                k = cls(params, compile_params(params, cfg, params.isa))
            _LOADED[key] = k
        return k


def precompile(params_list: list, arch: str | None = None, workers: int = 0) -> int:
    """Fill the kernel cache for many params at once: NVRTC releases the GIL, so worker threads
    compile in parallel (each through its own KernelCache handle on the same root, since one
    handle serialises its builds; entries are still locked on disk).  Returns how many kernels
    were built or found; failures are left for the real load to report."""
    import concurrent.futures as cf
    import os

    from bwta_compiler.runtime.cache import KernelCache

    from bwta_compiler import config as _config
    from bwta_compiler.select_cuda import linear_params

    arch = arch or (device_arch() if torch.cuda.is_available() else "sm_90")
    cfg = _config.resolve()
    todo = []
    for p in params_list:
        p = p.replace(isa=arch)
        if isinstance(p, GemmParams) and p.impl == "auto":
            todo += [linear_params(p, m, arch) for m in (1, 8, 16, 128, 4096)]
        else:
            todo.append(p)
    todo = list(dict.fromkeys(todo))

    def one(p) -> bool:
        try:
            cache = KernelCache(cfg.cache_dir, enabled=cfg.cache, size_limit_mb=cfg.cache_size_mb)
            compile_params(p, cfg, arch, cache=cache)
            return True
        except Exception:  # noqa: BLE001  (reported again by the real load)
            return False

    workers = workers or max(1, min(len(todo), (os.cpu_count() or 2), 16))
    with cf.ThreadPoolExecutor(workers) as ex:
        return sum(ex.map(one, todo))
