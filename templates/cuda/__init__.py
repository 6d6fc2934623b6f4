"""CUDA kernel templates (``*.cu.jinja``) and the shared device header ``bwta_common.cuh``."""

from bwta_compiler.kernels import register_template
from bwta_compiler.kernels import templates as _registered

CUDA_TEMPLATES = {
    "linear_mma": "linear_mma.cu.jinja",      # BT linear on binary tensor cores, in-loop packing
    "linear_popc": "linear_popc.cu.jinja",    # BT linear on CUDA cores (fallback, decode GEMV)
    "pack_act": "pack_act.cu.jinja",          # quantize + pack an attention operand
    "qbmm": "qbmm.cu.jinja",                  # batched TT / UT / BB on packed operands (mma | popc)
    "attn_fused": "attn_fused.cu.jinja",      # fused attention: TT scores -> integer softmax bits -> UT
}

for _name, _file in CUDA_TEMPLATES.items():
    if ("cuda", _name) not in _registered():
        register_template("cuda", _name, _file)
