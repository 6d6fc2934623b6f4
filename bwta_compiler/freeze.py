"""``bwta_compiler.freeze``: drop the float weights of BWTA layers for deployment.

Each :class:`BWTALinear` keeps only its packed binary codes (int32 words, 1 bit per weight) and
its per-channel scale, so the model's state dict shrinks about 32x for those layers and a
packed checkpoint saves and loads without the float weights.  A frozen model still runs
eagerly and compiles with ``backend="bwta"`` (the packed buffers are used directly).
"""

from __future__ import annotations

from torch import nn

from .modules import BWTALinear


def freeze(model: nn.Module, pad_bits: int = 64) -> nn.Module:
    """Freeze every BWTA linear layer of ``model`` in place and return it."""
    for mod in model.modules():
        if isinstance(mod, BWTALinear):
            mod.freeze_(pad_bits)
    return model


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the tensors in ``model.state_dict()``."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
