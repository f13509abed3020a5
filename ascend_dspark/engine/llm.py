"""`LLM`: load a target and a drafter by name or path, then generate from text.

    llm = LLM(model="default", drafter="dspark")
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=64))

With `tensor_parallel_size=N` the process must be one of N ranks (`torchrun --nproc-per-node N`
sets RANK / WORLD_SIZE; `ascend-dspark serve --tensor-parallel-size N` starts them itself).
Every rank loads the model and keeps its shard (models/parallel.py). On rank 0 `LLM(...)`
returns a normal LLM whose engine drives the others; on every other rank the constructor
follows rank 0's model runner until rank 0 closes its LLM (or exits) and then returns an LLM
with `is_driver` False, which refuses to generate:

    llm = LLM(model="default", tensor_parallel_size=2)
    if llm.is_driver:
        print(llm.generate(["Hello"])[0].text)
        llm.close()
"""

from __future__ import annotations

import atexit
import logging
import warnings
from pathlib import Path

import torch

from ascend_dspark.drafters import create_drafter, load_drafter
from ascend_dspark.distributed import join, launched_by_torchrun
from ascend_dspark.drafters.shipped import shipped_draft
from ascend_dspark.models import load_target
from ascend_dspark.models.parallel import shard_target
from ascend_dspark.platform import make_platform, set_platform
from ascend_dspark.spec.sampling import SamplingParams

from .engine import Engine
from .outputs import RequestOutput
from .tp_calls import follow

logger = logging.getLogger(__name__)

DRAFTER_KINDS = ("none", "eagle3", "dflash", "dspark")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_drafter(spec: str | None, target, seed: int = 0, model: str | None = None):
    """None for "none"; a checkpoint directory by path; a kind by name: the trained draft
    shipped for the default model (`model == "default"`), else a randomly initialised one,
    with one warning (it is lossless but accepts ~nothing)."""
    if spec is None or spec == "none":
        return None
    if Path(spec).exists():
        return load_drafter(spec, target)
    if spec not in DRAFTER_KINDS:
        raise ValueError(f"unknown drafter {spec!r}: expected one of {', '.join(DRAFTER_KINDS)} or a checkpoint directory")
    shipped = shipped_draft(spec, model)
    if shipped is not None:
        return load_drafter(shipped, target)
    warnings.warn(f"no trained {spec} draft ships for model {model!r}: using a randomly initialised {spec} draft "
                  f"(output stays exact; expect a mean accepted length near 1); train one with "
                  f"`ascend-dspark train` and pass its directory", stacklevel=2)
    return create_drafter(spec, target, seed=seed)


class LLM:
    def __init__(self, model: str = "default", drafter: str | None = "dspark", num_speculative_tokens: int = 7,
                 device: str | None = None, dtype: str | None = None, max_model_len: int = 2048,
                 max_batch_size: int = 8, seed: int = 0, tensor_parallel_size: int = 1, **engine_options) -> None:
        """`engine_options` go to `Engine`: num_kv_blocks, kv_block_size, kv_cache_fraction,
        max_prefill_tokens, graphs, graph_buckets, prefill_graphs, prefill_graph_buckets, progress,
        decode_steps_per_launch."""
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        self.tp = None
        self.is_driver = True
        self.platform = set_platform(make_platform(_rank_device(device, tensor_parallel_size)))
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        torch_dtype = DTYPES[dtype] if dtype else self.platform.default_dtype()
        self.platform.check_dtype(torch_dtype)
        self.target, self.tokenizer = load_target(model, torch_dtype, self.platform.device)
        self.drafter = build_drafter(drafter, self.target, seed, model)
        if self.drafter is not None:
            self.drafter.to(device=self.platform.device, dtype=torch_dtype).eval()
        if tensor_parallel_size > 1:        # after the drafter: it is checked against the whole target
            self.tp = join(self.platform, tensor_parallel_size)
            self.is_driver = self.tp.is_driver
            shard_target(self.target, self.tp)
            if not self.tp.is_driver:
                follow(self.target, self.drafter, self.platform)
                self.tp, self.engine = None, None
                return
            atexit.register(self.close)
        engine_options.setdefault("progress", True)          # the start-up graph capture shows a bar
        self.engine = Engine(self.target, self.drafter, self.tokenizer, num_speculative_tokens,
                             max_model_len, max_batch_size, self.platform, **engine_options)

    def close(self) -> None:
        """Tensor parallelism: tell the other ranks to stop (they exit); idempotent."""
        tp, self.tp = self.tp, None
        if tp is not None:
            atexit.unregister(self.close)
            if tp.failure is None:      # a broken group has nobody to tell
                tp.send_command(("stop", (), {}))

    def generate(self, prompts: str | list[str] | list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[RequestOutput]:
        """Generate for raw text prompts (or token-id lists); no chat template is applied."""
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = [p if isinstance(p, str) else None for p in prompts]
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        return self._generate(ids, texts, params, progress)

    def chat(self, conversations: list[dict] | list[list[dict]], params: SamplingParams | list[SamplingParams] | None = None,
             progress: bool = False) -> list[RequestOutput]:
        """Generate replies to chat conversations (the model's chat template is applied)."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        ids = [self.tokenizer.apply_chat_template(c) for c in conversations]
        return self._generate(ids, [None] * len(ids), params, progress)

    def _generate(self, ids, texts, params, progress) -> list[RequestOutput]:
        if not self.is_driver:
            raise RuntimeError("this tensor-parallel rank followed rank 0, which has closed the group: "
                               "only rank 0 generates (check `llm.is_driver`)")
        outputs = self.engine.generate(ids, params or SamplingParams(), progress)
        for out, text in zip(outputs, texts):
            out.prompt = text
            if out.text is None:
                out.text = self.tokenizer.decode(out.token_ids)
        return outputs


def _rank_device(device: str | None, tensor_parallel_size: int) -> str | None:
    """The device of this rank: an accelerator kind without an index (or none given) means
    the card of this rank's LOCAL_RANK under torchrun."""
    if tensor_parallel_size == 1 or not launched_by_torchrun():
        return device
    import os

    from ascend_dspark.platform import ENV_VAR, detect

    spec = device or os.environ.get(ENV_VAR) or detect()
    if spec in ("cuda", "npu"):
        return f"{spec}:{os.environ.get('LOCAL_RANK', '0')}"
    return spec
