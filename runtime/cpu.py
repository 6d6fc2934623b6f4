"""CPU target: render a kernel from ``GemmParams``, compile it through the kernel cache, load it
with ctypes and call it with tensor data pointers.

Stages (Triton-style ``make_<artifact>``): :func:`make_source` (Jinja) -> ``compile_cpu.make_so``
(cc) -> :func:`load_kernel` (ctypes).  The returned :class:`LoadedKernel` is callable with the
signature ``kernel_registry`` entries have, so the backend registers it under ``kernel.name``:

* linear (``params.op == "linear"``): ``fn(x, s, b, w_packed, scale, bias, out_dtype)``
* qbmm   (``params.op == "qbmm"``):   ``fn(a, a_s, a_b, b, b_s, b_b, scale, bias, out_dtype)``

Every call checks the shapes and dtypes the kernel was specialised for and raises ValueError
naming the tensor.  Threads: ``cfg.num_threads`` or, when 0, ``torch.get_num_threads()`` read at
each call (see compile_cpu's docstring for why the kernels share torch's OpenMP runtime).
"""

from __future__ import annotations

import ctypes
import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bwta_compiler import codegen, ops
from bwta_compiler.config import Config
from bwta_compiler.kernels import GemmParams, register_template, templates
from bwta_compiler.tensor_stamp import StampedMemo

from . import compile_cpu
from .host_memory import empty_output
from .cache import CacheKey, default_cache

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ISA_MACRO = {"avx512": "BWTA_ISA_AVX512", "avx2": "BWTA_ISA_AVX2", "portable": "BWTA_ISA_PORTABLE"}
_PLANES = {"ternary": 2, "bool": 1, "binary": 1}
# Template per kernel name; "bt" also serves the binary-activation linear (variant bb, op linear).
CPU_TEMPLATES = {"bt": "gemm_bt.c.jinja", "tt": "gemm_tt.c.jinja", "ut": "gemm_ut.c.jinja", "bb": "gemm_bb.c.jinja",
                 "rows": "qbmm_rows.c.jinja"}
# Word pairs (64-bit) below which a kernel runs on one thread: ~250 us of AVX2 work on one core.
# Measured on the shared 2-core AMD EPYC (load 4-6): a 2-thread fork-join there costs a median of
# 4-8 ms (whole scheduler ticks waiting for a preempted worker; torch's own bf16 F.linear at M = 1
# showed the same 8 ms), so a decode GEMV (4096x4096: 2.6e5 pairs, 0.17 ms on one thread) went from
# 0.17 ms to 8 ms with 2 threads.  Below this size the best case of a second thread (2x) is not
# worth that risk; above it the work dwarfs a fork-join.  (A candidate for a config flag.)
PAR_MIN_WORDS = 1 << 20
_LINEAR_MODES = {"ternary": "bt_ternary", "bool": "bt_bool", "binary": "bb"}

_LINEAR_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p,
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
_PACK_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p,
              ctypes.c_void_p, ctypes.c_int]
_QBMM_ARGS = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 12 + [ctypes.c_float] * 2 \
    + [ctypes.c_void_p] * 7 + [ctypes.c_int]
_ROWS_ARGS = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 5 + [ctypes.c_float] * 2 \
    + [ctypes.c_void_p] * 3 + [ctypes.c_int]


def _register_templates() -> None:
    known = templates()
    for name, filename in CPU_TEMPLATES.items():
        if ("cpu", name) not in known:
            register_template("cpu", name, filename)


_register_templates()


def available() -> bool:
    """True when generated CPU kernels can be built here (a C compiler exists)."""
    return compile_cpu.available()


# **** make_source: Params -> C text ***********************************************************


def template_name(params: GemmParams) -> str:
    return {"linear": "bt", "qbmm_rows": "rows"}.get(params.op, params.variant)


def check_params(params: GemmParams) -> None:
    """Reject Params the CPU templates cannot render (clear message naming the field)."""
    if params.op not in ("linear", "qbmm", "qbmm_rows"):
        raise ValueError(f"GemmParams.op must be 'linear', 'qbmm' or 'qbmm_rows', got {params.op!r}")
    if params.b_dtype and (params.op != "qbmm_rows" or params.b_dtype not in _DTYPES):
        raise ValueError(f"b_dtype={params.b_dtype!r}: a separate B dtype is a qbmm_rows option, one of {sorted(_DTYPES)}")
    if params.op == "qbmm_rows" and not (params.variant in ("ut", "tt") and params.b_act == "ternary"
                                         and params.b_kn and 1 <= params.n <= 1024):
        raise ValueError(f"a qbmm_rows kernel is ut/tt with a ternary [K, N] B and a static N in 1..1024, got "
                         f"variant={params.variant} b_act={params.b_act} b_kn={params.b_kn} n={params.n}")
    if params.isa not in _ISA_MACRO:
        raise ValueError(f"GemmParams.isa {params.isa!r} is not a CPU isa; expected one of {sorted(_ISA_MACRO)}")
    if params.kw % 2 or params.pad_bits % 64:
        raise ValueError(f"CPU kernels read 64-bit words: pad_bits must be a multiple of 64 "
                         f"(got pad_bits={params.pad_bits}, kw={params.kw})")
    if not (1 <= params.tile_m <= 8 and 1 <= params.tile_n <= 16):
        raise ValueError(f"tile {params.tile_m}x{params.tile_n} out of range (tile_m 1..8, tile_n 1..16)")
    if params.op == "linear" and (params.b_act != "binary" or params.n <= 0):
        raise ValueError(f"a linear kernel needs binary weights and a static N, got b_act={params.b_act} n={params.n}")
    if params.op == "qbmm" and params.variant not in ("tt", "ut", "bb"):
        raise ValueError(f"qbmm kernels are tt, ut or bb, got {params.variant!r}")


def template_values(params: GemmParams) -> dict[str, Any]:
    """The derived typed values a template needs besides the Params fields (logic stays here)."""
    linear = params.op == "linear"
    # block_n = 0: the whole of N is one block.
    block = -(-(params.block_n or max(params.n, 1)) // params.tile_n)
    # AVX2 BT: store the activation's NZ/A plane nibble-split (one op less per word pair, ~11 %).
    nibble = params.isa == "avx2" and linear and params.a_act in ("ternary", "bool")
    mode = _LINEAR_MODES[params.a_act] if linear else params.variant
    # AVX2 with 2-column tiles: full tiles drain and run the epilogue four outputs at a time.
    vector_tile = params.isa == "avx2" and params.tile_n == 2
    # AVX2 Q.K^T / P.V with one or two words per plane row (head dim <= 128): four B rows per vector.
    short_rows = (params.isa == "avx2" and params.op == "qbmm" and params.variant in ("tt", "ut")
                  and params.b_act == "ternary" and params.kw // 2 in (1, 2))
    return dict(
        vector_tile=vector_tile,
        short_rows=short_rows,
        template_name=template_name(params),
        mode=mode + "_nib" if nibble else mode,
        nibble=nibble,
        a_planes=_PLANES[params.a_act] + int(nibble),
        b_planes=1 if linear else _PLANES[params.b_act],
        kw64=params.kw // 2,
        isa_macro=_ISA_MACRO[params.isa],
        elem_bytes=_DTYPES[params.in_dtype].itemsize,
        out_bytes=_DTYPES[params.out_dtype].itemsize,
        block_tiles=max(1, block),
        par_min_words=PAR_MIN_WORDS,
    )


def make_source(params: GemmParams) -> str:
    """Render the C source of one kernel."""
    check_params(params)
    return codegen.render("cpu", template_name(params), params, **template_values(params))


def kernel_name(params: GemmParams) -> str:
    """Stable name, e.g. ``bt_n3072_k768_1a2b3c4d`` (hash of every Params field)."""
    h = hashlib.sha256(params.to_json().encode()).hexdigest()[:8]
    shape = {"linear": f"n{params.n}_k{params.k}", "qbmm_rows": f"rows_n{params.n}"}.get(params.op, f"qbmm_k{params.k}")
    return f"{params.variant}_{shape}_{h}"


# **** load: cache -> ctypes ********************************************************************


def _override_source(source: str, cfg: Config) -> str:
    """A hand-edited replacement from kernel_override_dir, keyed by the rendered source's hash."""
    if not cfg.kernel_override_dir:
        return source
    path = Path(cfg.kernel_override_dir) / f"{hashlib.sha256(source.encode()).hexdigest()}.c"
    return path.read_text() if path.is_file() else source


def load_kernel(params: GemmParams, cfg: Config) -> LoadedKernel | None:
    """Render, compile (through the cache) and load the kernel for ``params``.

    Returns None when there is no C compiler (``available()`` warned once; use the reference
    ops).  Raises ValueError for Params the templates cannot render or an ISA this CPU lacks,
    and ``CompileError`` (log + source path) when the compiler fails.
    """
    if not available():
        return None
    source = _override_source(make_source(params), cfg)
    options = compile_cpu.compile_options(params.isa)
    key = CacheKey(target="cpu", source_sha256=hashlib.sha256(source.encode()).hexdigest(),
                   options=options.text(), arch=compile_cpu.arch_string(),
                   compiler=compile_cpu.compiler_version(), bwta=codegen.bwta_key())
    name = kernel_name(params)
    entry = default_cache(cfg).lookup_or_build(
        key, source, f"{name}.so", lambda src, art: compile_cpu.make_so(src, art, options),
        force=cfg.always_compile)
    if not compile_cpu.isa_supported(params.isa):
        raise ValueError(f"kernel {name} was built for isa={params.isa}, which this CPU "
                         f"({compile_cpu.detect_isa()}) cannot run")
    return LoadedKernel(params=params, name=name, source=source, key_lines=key.debug_lines(), log=entry.log,
                        artifact_path=entry.artifact_path, cache_hit=entry.hit, num_threads=cfg.num_threads)


# **** LoadedKernel: checks, buffers, the call *************************************************


@dataclass
class LoadedKernel:
    """A loaded generated kernel, callable with the kernel_registry signature of its op."""

    params: GemmParams
    name: str
    source: str
    key_lines: list[str]
    log: str
    artifact_path: Path
    cache_hit: bool
    num_threads: int = 0
    _lib: Any = field(default=None, repr=False)
    _thresholds: dict = field(default_factory=dict, repr=False)
    _recent: StampedMemo = field(default_factory=lambda: StampedMemo(64), repr=False)
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def __post_init__(self) -> None:
        self._a_planes = template_values(self.params)["a_planes"]  # internal packed planes per row
        p = self.params
        self._in_dt, self._out_dt = _DTYPES[p.in_dtype], _DTYPES[p.out_dtype]
        self._w_shape = torch.Size((p.n, p.kw))
        self._scale_numel = p.n if p.scale_per_col else 1
        self._lib = ctypes.CDLL(str(self.artifact_path))
        if self.params.op == "linear":
            self._lib.bwta_linear.argtypes, self._lib.bwta_linear.restype = _LINEAR_ARGS, None
            self._lib.bwta_pack.argtypes, self._lib.bwta_pack.restype = _PACK_ARGS, None
        elif self.params.op == "qbmm_rows":
            self._lib.bwta_qbmm_rows.argtypes, self._lib.bwta_qbmm_rows.restype = _ROWS_ARGS, None
        else:
            self._lib.bwta_qbmm.argtypes, self._lib.bwta_qbmm.restype = _QBMM_ARGS, None

    def __call__(self, *args: Any) -> Tensor:
        if self.params.op == "linear":
            return self._call_linear(*args)
        if self.params.op == "qbmm_rows":
            return self._call_qbmm_rows(*args)
        return self._call_qbmm(*args)

    # ---- shared helpers --------------------------------------------------------------------

    def _threads(self) -> int:
        return self.num_threads or torch.get_num_threads()

    def _threshold(self, act: str, s: Tensor, b: Tensor | None, dtype: torch.dtype) -> float:
        """The code threshold as an exact fp32 value, from the one definition in ops (memoised)."""
        if act == "binary":
            return 0.0
        # By identity first: a graph passes the same scale tensors on every call, and reading
        # their values (float(s)) costs more than the M = 1 kernel's own bookkeeping.
        hit = self._recent.get((act, dtype), (s, b))
        if hit is not StampedMemo.MISS:
            return hit
        sv, bv = float(s), (float(b) if b is not None else 0.0)
        key = (act, sv, bv, dtype)
        if key not in self._thresholds:
            s_t = torch.tensor(sv, dtype=torch.float32)
            if act == "ternary":
                t = ops.ternary_thresholds(s_t, 1, dtype)
            else:
                t = ops.bool_thresholds(s_t, torch.tensor(bv, dtype=torch.float32), 1, dtype)
            self._thresholds[key] = float(t[0])
        self._recent.put((act, dtype), (s, b), self._thresholds[key])
        return self._thresholds[key]

    def _buffer(self, slot: str, numel: int, dtype: torch.dtype) -> Tensor:
        """Grow-only per-thread scratch buffers (no allocator traffic or page faults per call)."""
        buf = getattr(self._local, slot, None)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=dtype)
            setattr(self._local, slot, buf)
        return buf

    def _check_input(self, name: str, t: Tensor, k_dim: int) -> None:
        want = _DTYPES[self.params.in_dtype]
        if t.dtype != want:
            raise ValueError(f"{self.name}: {name} has dtype {t.dtype}, kernel was built for {want}")
        if t.dim() < 1 or t.shape[k_dim] != self.params.k:
            raise ValueError(f"{self.name}: {name} {tuple(t.shape)} has K={t.shape[k_dim] if t.dim() else None} "
                             f"at dim {k_dim}, kernel was built for K={self.params.k}")

    def _epilogue_args(self, scale: Tensor | None, bias: Tensor | None, n: int,
                       out_dtype: torch.dtype | None) -> tuple[Tensor | None, Tensor | None]:
        p = self.params
        if (scale is not None) != p.has_scale or (bias is not None) != p.has_bias:
            raise ValueError(f"{self.name}: built with has_scale={p.has_scale} has_bias={p.has_bias}, called with "
                             f"scale={'set' if scale is not None else None} bias={'set' if bias is not None else None}")
        if (out_dtype or torch.float32) != _DTYPES[p.out_dtype]:
            raise ValueError(f"{self.name}: out_dtype {out_dtype} but kernel was built for {p.out_dtype}")
        if scale is not None:
            want = n if p.scale_per_col else 1
            if scale.numel() != want:
                raise ValueError(f"{self.name}: scale {tuple(scale.shape)} must hold {want} value(s) "
                                 f"(scale_per_col={p.scale_per_col}, N={n})")
            scale = _f32_vector(scale)
        if bias is not None:
            if bias.numel() != n:
                raise ValueError(f"{self.name}: bias {tuple(bias.shape)} must hold N={n} values")
            bias = _f32_vector(bias)
        return scale, bias

    # ---- linear ----------------------------------------------------------------------------

    def _check_weight(self, w: Tensor) -> Tensor:
        p = self.params
        if w.dtype != torch.int32 or tuple(w.shape) != (p.n, p.kw):
            raise ValueError(f"{self.name}: w_packed is {w.dtype} {tuple(w.shape)}, kernel was built for "
                             f"int32 ({p.n}, {p.kw})")
        return w if w.is_contiguous() else w.contiguous()

    def _call_linear(self, x: Tensor, s: Tensor, b: Tensor | None, w_packed: Tensor,
                     scale: Tensor | None, bias: Tensor | None, out_dtype: torch.dtype | None) -> Tensor:
        p = self.params
        if (x.dim() == 2 and x.dtype is self._in_dt and w_packed.dtype is torch.int32
                and (out_dtype is None or out_dtype is self._out_dt) and x.is_contiguous()
                and w_packed.is_contiguous() and x.shape[1] == p.k and w_packed.shape == self._w_shape
                and _plain_f32(scale, p.has_scale, self._scale_numel) and _plain_f32(bias, p.has_bias, p.n)):
            # The call of a compiled graph (2-D contiguous x, fp32 epilogue vectors) checked in one
            # expression: the step-by-step checks below were a third of a 768x768 decode kernel's time.
            return self._launch_linear(x, x.shape[0], s, b, w_packed, scale, bias)
        self._check_input("x", x, -1)
        w = self._check_weight(w_packed)
        scale, bias = self._epilogue_args(scale, bias, p.n, out_dtype)
        x2 = x if x.dim() == 2 and x.is_contiguous() else x.detach().reshape(-1, p.k).contiguous()
        out = self._launch_linear(x2, x2.shape[0], s, b, w, scale, bias)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], p.n)

    def _launch_linear(self, x2: Tensor, m: int, s: Tensor, b: Tensor | None, w: Tensor, scale: Tensor | None,
                       bias: Tensor | None) -> Tensor:
        """The kernel call on checked operands: x2 [m, K] contiguous, w [N, Kw] contiguous int32."""
        p = self.params
        out = empty_output((m, p.n), self._out_dt)
        if m == 0:
            return out
        t = self._threshold(p.a_act, s, b, x2.dtype)
        work = self._buffer("work", m * self._a_planes * p.kw // 2, torch.int64)
        pop = self._buffer("pop", m, torch.int32)
        self._lib.bwta_linear(x2.data_ptr(), m, t, w.data_ptr(), _ptr(scale), _ptr(bias), out.data_ptr(),
                              work.data_ptr(), pop.data_ptr(), self._threads())
        return out

    def pack(self, x: Tensor, s: Tensor, b: Tensor | None = None) -> Tensor:
        """Quantize+pack ``x`` [..., K] with this kernel's packer into bwta's exchange format
        (ternary [..., 2, Kw], else [..., Kw] int32 words), the same as ``reference.quantize_pack``."""
        p = self.params
        self._check_input("x", x, -1)
        x2 = x.detach().reshape(-1, p.k).contiguous()
        m, planes = x2.shape[0], _PLANES[p.a_act]
        shape = (*x.shape[:-1], 2, p.kw) if planes == 2 else (*x.shape[:-1], p.kw)
        out = torch.empty(shape, dtype=torch.int32)
        work = self._buffer("work", max(m, 1) * self._a_planes * p.kw // 2, torch.int64)
        pop = self._buffer("pop", max(m, 1), torch.int32)
        if m:
            self._lib.bwta_pack(x2.data_ptr(), m, self._threshold(p.a_act, s, b, x.dtype), out.data_ptr(),
                                work.data_ptr(), pop.data_ptr(), self._threads())
        return out

    # ---- qbmm ------------------------------------------------------------------------------

    def _call_qbmm(self, a: Tensor, a_s: Tensor, a_b: Tensor | None, b: Tensor, b_s: Tensor,
                   b_b: Tensor | None, scale: Tensor | None, bias: Tensor | None,
                   out_dtype: torch.dtype | None) -> Tensor:
        p = self.params
        self._check_input("a", a, -1)
        self._check_input("b", b, -2 if p.b_kn else -1)
        n = b.shape[-1] if p.b_kn else b.shape[-2]
        if p.n and n != p.n:
            raise ValueError(f"{self.name}: b {tuple(b.shape)} has N={n}, kernel was built for N={p.n}")
        scale, bias = self._epilogue_args(scale, bias, n, out_dtype)
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        m = a.shape[-2]
        out = empty_output((*batch, m, n), _DTYPES[p.out_dtype])
        if out.numel() == 0:
            return out
        # Both operands are read where they lie (head-split, permuted, broadcast): no copies.
        a4, b4 = _two_level_batch(a, batch), _two_level_batch(b, batch)
        nb, nb2 = a4.shape[0] * a4.shape[1], a4.shape[1]
        # Element (i, n, k) of B: [.., N, K] strides as they are; [.., K, N] read column-wise.
        bs, bs2, r_s, c_s = b4.stride()
        b_strides = (bs, bs2, c_s, r_s) if p.b_kn else (bs, bs2, r_s, c_s)
        kw64 = p.kw // 2
        wa = self._buffer("wa", nb * m * _PLANES[p.a_act] * kw64, torch.int64)
        pa = self._buffer("pa", nb * m, torch.int32)
        wb = self._buffer("wb", nb * n * _PLANES[p.b_act] * kw64, torch.int64)
        pb = self._buffer("pb", nb * n, torch.int32)
        self._lib.bwta_qbmm(a4.data_ptr(), b4.data_ptr(), nb, nb2, m, n, *a4.stride(), *b_strides,
                            self._threshold(p.a_act, a_s, a_b, a.dtype), self._threshold(p.b_act, b_s, b_b, b.dtype),
                            _ptr(scale), _ptr(bias), out.data_ptr(), wa.data_ptr(), pa.data_ptr(), wb.data_ptr(),
                            pb.data_ptr(), self._threads())
        return out

    def _call_qbmm_rows(self, a: Tensor, a_s: Tensor, a_b: Tensor | None, b: Tensor, b_s: Tensor,
                        b_b: Tensor | None, scale: Tensor | None, bias: Tensor | None,
                        out_dtype: torch.dtype | None) -> Tensor:
        """``bwta::qbmm`` with B in [.., K, N] layout and K a run-time length (see qbmm_rows.c.jinja)."""
        p = self.params
        for name, t, dt in (("a", a, p.in_dtype), ("b", b, p.b_dtype or p.in_dtype)):
            want = _DTYPES[dt]
            if t.dtype != want or t.dim() < 2:
                raise ValueError(f"{self.name}: {name} is {t.dtype} {tuple(t.shape)}, kernel was built for {want} "
                                 f"with at least 2 dims")
        k, n = a.shape[-1], b.shape[-1]
        if b.shape[-2] != k or n != p.n:
            raise ValueError(f"{self.name}: a {tuple(a.shape)} and b {tuple(b.shape)} do not match "
                             f"[.., M, K] x [.., K, N={p.n}]")
        scale, bias = self._epilogue_args(scale, bias, n, out_dtype)
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        m = a.shape[-2]
        out = empty_output((*batch, m, n), _DTYPES[p.out_dtype])
        if out.numel() == 0:
            return out
        a3 = a.detach().expand(*batch, m, k).reshape(-1, m, k).contiguous()
        b3 = b.detach().expand(*batch, k, n).reshape(-1, k, n)
        if b3.stride(-1) != 1:
            b3 = b3.contiguous()
        self._lib.bwta_qbmm_rows(a3.data_ptr(), b3.data_ptr(), a3.shape[0], m, k, b3.stride(0), b3.stride(1),
                                 self._threshold(p.a_act, a_s, a_b, a.dtype),
                                 self._threshold(p.b_act, b_s, b_b, b.dtype),
                                 _ptr(scale), _ptr(bias), out.data_ptr(), self._threads())
        return out


def _two_level_batch(t: Tensor, batch: torch.Size) -> Tensor:
    """``t`` [..., R, C] broadcast to ``batch`` leading dims as a 4-d [nb1, nb2, R, C] view: the
    kernels take a two-level batch (batch x heads) with any strides, so a head-split or permuted
    attention operand costs no copy.  Only a third batch dim that cannot merge with the first copies."""
    e = t.detach().expand(*batch, *t.shape[-2:])
    if len(batch) < 2:
        return e.reshape((1,) * (2 - len(batch)) + tuple(e.shape))  # new size-1 dims: always a view
    return e.reshape(-1, *e.shape[-3:])  # merges leading batch dims: a view when their strides allow


def _plain_f32(t: Tensor | None, expected: bool, numel: int) -> bool:
    """``t`` is what the kernel takes as is: absent when not expected, else contiguous fp32 of ``numel``."""
    if t is None:
        return not expected
    return expected and t.dtype is torch.float32 and t.is_contiguous() and t.numel() == numel


def _f32_vector(t: Tensor) -> Tensor:
    """``t`` as contiguous fp32 (no copy, and no dispatcher calls, when it already is: per-call overhead
    matters at M = 1, where the kernel itself runs for microseconds)."""
    if t.dtype is torch.float32 and t.is_contiguous():
        return t
    return t.detach().reshape(-1).to(torch.float32).contiguous()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
