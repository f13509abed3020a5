"""Tiny random targets shared by the test suite.

- `tiny_target(arch)`: (our DecoderModel, the transformers model) with identical weights,
  built in memory: the fast path for exactness tests.
- `tiny_hf_checkpoint(arch, dir)`: the same kind of model saved as an HF directory
  (config.json + model.safetensors + a tiny character tokenizer with a chat template),
  for loader and end-to-end tests.
- `new_cache` / `run_batch`: a KV cache sized for a model and one ragged forward through it.
- `greedy_decode` / `hf_greedy`: plain greedy decoding through our cache / transformers'
  `generate`, both stopping after EOS: the reference outputs for lossless tests.

Weights are re-drawn with a large std (0.3, norms around their identity value) so logits
are far from uniform: greedy decoding then has clear winners and a wrong mask, RoPE or
norm changes the output visibly instead of hiding in near-ties. Gemma3 mixes sliding and
full layers with a 4-token window, so prompts longer than 4 tokens exercise the window;
Gemma3 uses linear RoPE scaling on its full layers and Llama the "llama3" scaling, as the
real checkpoints do. Embeddings are untied unless `tie_word_embeddings=True` is passed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ascend_dspark.cache import PagedKVCache
from ops.context import ForwardContext
from ops.registry import OpRegistry
from ascend_dspark.models import DecoderModel, ModelConfig

ARCHS = ("llama", "qwen3", "gemma3")
SLIDING_WINDOW = 4
PAD, BOS, EOS = 0, 1, 2

_SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_hf_config(arch: str, vocab: int = 128, num_layers: int = 4, **overrides):
    """A transformers config: hidden 64, 4 heads, 2 KV heads, head_dim 16, eager attention."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    if arch == "llama":
        cls = LlamaConfig
        common["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64}
    elif arch == "qwen3":
        cls = Qwen3Config
    elif arch == "gemma3":
        cls = Gemma3TextConfig
        common.update(
            sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=24, final_logit_softcapping=10.0,
            # Untied: with random weights, a tied head plus the sqrt(H) embedding scale makes
            # the input token win every step (greedy output "x x x ..."). Tie via overrides.
            tie_word_embeddings=False,
            layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(num_layers)],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}})
    else:
        raise ValueError(f"unknown arch {arch!r}: expected one of {ARCHS}")
    config = cls(**{**common, **overrides})
    config._attn_implementation = "eager"      # the plain reference path, exact in float64
    return config


def tiny_hf_model(arch: str, vocab: int = 128, dtype: torch.dtype = torch.float32, std: float = 0.3,
                  seed: int = 0, **overrides):
    """A random transformers causal LM in eval mode (deterministic for a given seed)."""
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(arch, vocab, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed)
    gemma_norms = arch == "gemma3"                      # Gemma scales by (1 + w)
    with torch.no_grad():
        for name, p in model.named_parameters():      # tied weights are listed once
            if p.ndim == 1:                            # norms (and biases if any)
                fresh = torch.randn(p.shape, generator=gen) * 0.1
                if "norm" in name and not gemma_norms:
                    fresh += 1.0
            else:
                fresh = torch.randn(p.shape, generator=gen) * std
            p.copy_(fresh)
    return model.to(dtype).eval()


def tiny_target(arch: str, dtype: torch.dtype = torch.float64, vocab: int = 128, std: float = 0.3,
                seed: int = 0, **overrides) -> tuple[DecoderModel, "torch.nn.Module"]:
    """(our DecoderModel, the transformers model) sharing the same random weights."""
    hf = tiny_hf_model(arch, vocab, dtype, std, seed, **overrides)
    ours = DecoderModel(ModelConfig.from_dict(hf.config.to_dict()))
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours.to(dtype).eval().requires_grad_(False), hf


def tiny_tokenizer(vocab: int = 128):
    """A character-level fast tokenizer (ids < vocab) with a ChatML chat template."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    tokens = (_SPECIALS + chars)[:vocab]
    raw = RawTokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    raw.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>",
                                  eos_token="<|im_end|>", additional_special_tokens=_SPECIALS[3:])
    tok.chat_template = _CHAT_TEMPLATE
    return tok


def tiny_hf_checkpoint(arch: str, tmp_path: Path, vocab: int = 128, std: float = 0.3, seed: int = 0,
                       **overrides) -> Path:
    """Save a tiny random model (config.json + model.safetensors) and tokenizer; return the dir."""
    out = Path(tmp_path) / f"tiny-{arch}"
    model = tiny_hf_model(arch, vocab, torch.float32, std, seed, **overrides)
    model.save_pretrained(str(out))           # safetensors by default
    tiny_tokenizer(vocab).save_pretrained(str(out))
    return out


def new_cache(model: DecoderModel, num_slots: int = 1, capacity: int = 64) -> PagedKVCache:
    """A KV cache matching the model's layers, heads and dtype."""
    cfg = model.config
    weight = model.lm_head.weight
    return PagedKVCache.contiguous(cfg.num_layers, num_slots, capacity, cfg.num_kv_heads, cfg.head_dim,
                   weight.dtype, weight.device)


def run_batch(model: DecoderModel, cache: PagedKVCache, tokens: list[list[int]], starts: list[int],
              slots: list[int] | None = None, capture_layers: tuple[int, ...] = (), registry=None):
    """One right-padded ragged forward: row b holds tokens[b] at positions starts[b]...
    (`registry`: a platform's op registry; default: each device type's own backend).

    Returns (logits [B, T, V], features or None, valid [B, T]). Padding rows use position 0
    and valid=False, so their K/V land in the scratch row.
    """
    b, t = len(tokens), max(len(row) for row in tokens)
    device = model.lm_head.weight.device
    ids = torch.zeros(b, t, dtype=torch.long)
    positions = torch.zeros(b, t, dtype=torch.long)
    valid = torch.zeros(b, t, dtype=torch.bool)
    for i, (row, start) in enumerate(zip(tokens, starts)):
        ids[i, :len(row)] = torch.tensor(row)
        positions[i, :len(row)] = torch.arange(start, start + len(row))
        valid[i, :len(row)] = True
    slot_ids = torch.tensor(slots if slots is not None else list(range(b)))
    with torch.inference_mode():
        ctx = ForwardContext(registry) if registry is not None else None
        out = model(ids.to(device), positions.to(device), cache, slot_ids.to(device), valid.to(device),
                    capture_layers=capture_layers, ctx=ctx)
        return model.logits(out.hidden), out.features, valid


def greedy_decode(model: DecoderModel, prompt: list[int], max_new_tokens: int,
                  eos_token_ids: tuple[int, ...] = ()) -> list[int]:
    """Plain greedy decoding through the KV cache: prefill, then one token per forward."""
    cache = new_cache(model, 1, len(prompt) + max_new_tokens)
    logits, _, _ = run_batch(model, cache, [prompt], [0])
    out = [int(logits[0, -1].argmax())]
    while len(out) < max_new_tokens and out[-1] not in eos_token_ids:
        cache.set_lengths(torch.tensor([0]), torch.tensor([len(prompt) + len(out) - 1]))
        logits, _, _ = run_batch(model, cache, [[out[-1]]], [len(prompt) + len(out) - 1])
        out.append(int(logits[0, -1].argmax()))
    return out


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy `generate` (stops after the config's EOS, like `greedy_decode`)."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=max_new_tokens)
    return out[0, len(prompt):].tolist()


def cache_rows(tables, slot: int) -> torch.Tensor:
    """Flat cache rows of positions 0.. of a slot's owned blocks (block * block_size + offset)."""
    blocks = torch.tensor(tables.owned[slot], dtype=torch.long)
    return (blocks.unsqueeze(1) * tables.block_size + torch.arange(tables.block_size)).flatten().to(tables.device)


def slot_positions(cache: PagedKVCache, tensor: torch.Tensor, slot: int) -> torch.Tensor:
    """A copy of one layer's K or V of a slot as [positions, Hkv, D]."""
    return tensor.view(-1, *tensor.shape[2:]).index_select(0, cache_rows(cache.tables, slot))


def select_rows(batch, rows: torch.Tensor, params: list):
    """The SamplingBatch of `rows` of `batch` (`params`: the matching SamplingParams)."""
    from ascend_dspark.spec.sampling import SamplingBatch

    sub = SamplingBatch(params, batch.device, batch.ops)
    for name in SamplingBatch.TENSORS:
        setattr(sub, name, getattr(batch, name).index_select(0, rows))
    return sub


class RecordingRegistry(OpRegistry):
    """TEST DOUBLE: the reference ops of a CPU registry, with the name of every op it resolves."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.seen: set[str] = set()

    def resolve(self, op, device):
        self.seen.add(op)
        return super().resolve(op, device)
