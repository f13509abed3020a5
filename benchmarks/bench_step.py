"""The cost of one step against the hardware's floor, and how busy the device stays.

    python benchmarks/bench_step.py --out step.json

1. Qwen3-8B-shaped target (random bf16 weights; shapes are what matter): a plain decode
   step at batch 1 (whole-step graph replay, 64 steps after a 512-token prompt; with the
   engine's overlap of host and device work, and without) against the weight-read floor (bytes of weights / the H200's measured 4.2 TB/s), and one verify
   forward of 8 tokens against a 1-token forward (both replayed as CUDA graphs at the same
   context length).
2. Device busy fraction while decoding at batch 1 (SmolLM2-135M shape, graph replay, with
   and without overlap): the
   union of GPU kernel intervals over the wall time from the first to the last kernel of
   the decode, from a torch.profiler trace.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HBM_BYTES_PER_S = 4.2e12        # measured on the H200 (shared/reference anchors)
QWEN3_8B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=4096,
                intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2)


def random_model(raw: dict, dtype, device):
    """Built on the device (its default initialisation runs there: seconds, not minutes)."""
    import torch

    from ascend_dspark.models.config import ModelConfig
    from ascend_dspark.models.decoder import DecoderModel

    torch.manual_seed(0)
    with torch.device(device):
        model = DecoderModel(ModelConfig.from_dict(raw))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def decode_step(platform, target, context: int, steps: int, overlap: bool | None = None) -> float:
    from ascend_dspark.engine.engine import Engine
    from ascend_dspark.spec.sampling import SamplingParams

    engine = Engine(target, None, max_model_len=context + steps + 8, max_batch_size=1, platform=platform,
                    overlap=overlap)
    prompt = [(7 * i) % 1000 + 10 for i in range(context)]
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    engine.generate([prompt], params)                                   # warm-up
    engine.generate([prompt], params)
    return engine.timings.decode_s / max(engine.timings.generated_tokens - 1, 1)


def forward_ms(platform, target, width: int, context: int, reps: int = 50) -> float:
    """One target forward of `width` tokens at `context`, replayed from a CUDA graph."""
    import torch

    from ascend_dspark.cache import PagedKVCache

    cfg, dev = target.config, platform.device
    cache = PagedKVCache.contiguous(cfg.num_layers, 1, context + width, cfg.num_kv_heads, cfg.head_dim,
                                    next(target.parameters()).dtype, dev)
    ids = torch.zeros(1, width, dtype=torch.long, device=dev)
    positions = (context + torch.arange(width, device=dev)).unsqueeze(0)
    slots = torch.zeros(1, dtype=torch.long, device=dev)
    valid = torch.ones(1, width, dtype=torch.bool, device=dev)
    graph = platform.graph()
    with torch.inference_mode():
        graph.capture(lambda: target.logits(target(ids, positions, cache, slots, valid).hidden))
        platform.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            graph.replay()
        platform.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def busy_fraction(platform, target, steps: int = 64, overlap: bool | None = None) -> float:
    from torch.profiler import ProfilerActivity, profile

    from ascend_dspark.engine.engine import Engine
    from ascend_dspark.spec.sampling import SamplingParams

    engine = Engine(target, None, max_model_len=256, max_batch_size=1, platform=platform, overlap=overlap)
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    engine.generate([list(range(100, 132))], params)
    engine.add_request("warm", list(range(100, 132)), SamplingParams(temperature=0.0, max_tokens=steps + 4,
                                                                       ignore_eos=True), detokenize=False)
    engine.step()
    engine.step()                                       # prefill and the first decode step, untraced
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        while engine.has_unfinished():
            engine.step()
        platform.synchronize()
    trace = Path(tempfile.mkdtemp()) / "trace.json"
    prof.export_chrome_trace(str(trace))
    kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in json.loads(trace.read_text())["traceEvents"]
                     if e.get("cat") == "kernel")
    busy, end = 0.0, None
    for start, stop in kernels:
        if end is None or start > end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return busy / (kernels[-1][1] - kernels[0][0])


def main() -> None:
    import torch

    from ascend_dspark.platform import make_platform
    from benchmarks.bench_decode import SMOLLM2_135M

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    platform = make_platform("cuda")
    res = {"date": dt.date.today().isoformat(), "device": torch.cuda.get_device_name()}
    big = random_model(QWEN3_8B, torch.bfloat16, platform.device)
    weight_bytes = sum(t.numel() * t.element_size() for t in big.parameters())
    floor_ms = weight_bytes / HBM_BYTES_PER_S * 1e3
    step_ms = decode_step(platform, big, context=512, steps=64) * 1e3
    step_sync_ms = decode_step(platform, big, context=512, steps=64, overlap=False) * 1e3
    one, eight = forward_ms(platform, big, 1, 512), forward_ms(platform, big, 8, 512)
    res["qwen3_8b"] = {"weight_gb": weight_bytes / 1e9, "floor_ms": floor_ms, "decode_step_ms": step_ms,
                       "step_vs_floor": step_ms / floor_ms, "decode_step_no_overlap_ms": step_sync_ms,
                       "forward_1_ms": one, "forward_8_ms": eight, "forward_1_vs_floor": one / floor_ms,
                       "verify8_vs_step1": eight / one}
    print(json.dumps(res["qwen3_8b"], indent=1), flush=True)
    del big
    torch.cuda.empty_cache()
    small = random_model(SMOLLM2_135M, torch.bfloat16, platform.device)
    res["smollm2_busy_fraction"] = busy_fraction(platform, small)
    res["smollm2_busy_fraction_no_overlap"] = busy_fraction(platform, small, overlap=False)
    print("busy fraction", res["smollm2_busy_fraction"], "without overlap", res["smollm2_busy_fraction_no_overlap"],
          flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
