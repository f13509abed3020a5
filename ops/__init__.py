"""Fused operators used by the target models, drafters and verifier.

Each op module holds the plain-torch reference (the spec, runs everywhere). Device
backends (Triton on CUDA, torch_npu on Ascend) plug in behind the same function names;
callers only ever import from here.
"""

from .activation import gelu_tanh_and_mul, silu_and_mul
from .attention import attention, build_attention_mask
from .grammar import apply_token_bitmask
from .kv_cache import kv_write
from .linear import linear
from .markov import markov_confidence_step
from .norm import add_rms_norm, rms_norm
from .rotary import apply_rotary, rotary_cos_sin
from .sampling import (apply_min_p, apply_temperature_top_k_top_p, counter_uniform, counter_uniform_vocab,
                       exponential_race)
from .verify import verify_chain, verify_chain_greedy

__all__ = [
    "rms_norm", "add_rms_norm", "apply_rotary", "rotary_cos_sin", "silu_and_mul",
    "gelu_tanh_and_mul", "linear", "attention", "build_attention_mask", "kv_write",
    "apply_temperature_top_k_top_p", "apply_min_p", "counter_uniform", "counter_uniform_vocab",
    "exponential_race", "verify_chain", "verify_chain_greedy", "markov_confidence_step", "apply_token_bitmask",
]
