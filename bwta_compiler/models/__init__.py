"""Example models: a BERT-style encoder and a LLaMA-style decoder (configurable sizes,
including BERT-base and LLaMA-7B layer shapes)."""

from .decoder import Decoder, DecoderConfig
from .encoder import Encoder, EncoderConfig

__all__ = ["Decoder", "DecoderConfig", "Encoder", "EncoderConfig"]
