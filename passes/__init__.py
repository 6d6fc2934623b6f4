"""The pass pipeline: pure functions ``(gm, ctx) -> gm``, one per file, run in this order."""

from .context import FoldedWeight, MatmulRecord, PassContext
from .eliminate_dead_code import eliminate_dead_code
from .fold_weight_codes import fold_weight_codes
from .fuse_epilogue import fuse_epilogue
from .fuse_lowbit_matmul import FusedSpec, fuse_lowbit_matmul
from .normalize_matmul import normalize_matmul
from .remove_grad_scale import remove_grad_scale
from .runner import run_pipeline
from .select_kernels import select_kernels

PIPELINE = (
    remove_grad_scale,      # LSQ gradient-scale identities out of the inference graph
    normalize_matmul,       # addmm/baddbmm/linear -> mm/bmm + add; record every MatMul
    fold_weight_codes,      # binary_code(frozen W) -> packed int32 words + alpha constants
    fuse_lowbit_matmul,     # code ops -> layout -> mm/bmm  ==>  bwta::linear / bwta::qbmm
    fuse_epilogue,          # * scale + bias -> cast  ==>  into the fused op
    select_kernels,         # KernelChoice per fused node
    eliminate_dead_code,
)

__all__ = ["PIPELINE", "FoldedWeight", "FusedSpec", "MatmulRecord", "PassContext", "run_pipeline"]
