"""Target models: Llama / Qwen3 / Gemma3 decoders over the slot KV cache, and their loading."""

from .config import ModelConfig
from .decoder import DecoderModel
from .loader import load_target
from .tokenizer import Tokenizer

__all__ = ["load_target", "DecoderModel", "ModelConfig", "Tokenizer"]
