"""Graph padding rows on the NPU platform (torch_npu replaced by its TEST DOUBLE, see
test_npu_end_to_end.py): a decode batch of 3 replays the bucket-4 graph with one padding
row, in a padding slot of its own. The engine resets every padding slot's cache length to
0 after each step, so padding rows always verify at positions 0..K, inside the blocks they
own and within the reach their attention hints give (the reserve): checked after every
step of a whole generate.
"""

from __future__ import annotations

import torch
from test_npu_end_to_end import K, _build_models_before_the_double, _models, npu, use_npu_in_float32  # noqa: F401

from ascend_dspark.engine.engine import Engine
from ascend_dspark.spec.sampling import SamplingParams

PROMPTS = [[5, 17, 3, 44, 9, 1, 30], [9, 1, 44], [60, 61, 62, 63]]


def test_padding_rows_verify_from_position_0_at_every_step(npu, monkeypatch):  # noqa: F811  (the fixture)
    target, drafter = _models("qwen3", torch.float32)
    use_npu_in_float32(npu, monkeypatch)
    engine = Engine(target, drafter, num_speculative_tokens=K, max_model_len=64, max_batch_size=4,
                    kv_block_size=128, graphs=True)
    pads = engine.runner.pad_slots
    assert len(pads) == 4 and engine.runner.cache.lengths[pads].tolist() == [0] * 4
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        assert engine.runner.cache.lengths[pads].tolist() == [0] * 4, steps
    assert (4, ) in {key[:1] for key in engine.runner.graph_runner.graphs}       # the padded bucket replayed
