"""Our decoders against transformers: prefill, cached decode, rollback, ragged batches, features.

Every test runs on Llama (llama3 RoPE scaling), Qwen3 (q/k norms) and Gemma3 (sliding and
full layers with a 4-token window, linear RoPE scaling, soft-capping).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import ARCHS, greedy_decode, hf_greedy, new_cache, run_batch, tiny_target

TOL = {torch.float32: 1e-4, torch.float64: 1e-5}   # relative to the largest |logit|
SEQ = [5, 17, 3, 9, 1, 44, 2, 7, 30, 8, 60, 61, 12, 99, 100, 4, 23]


def assert_close(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    ref = ref.float()
    err = ((ours.float() - ref).abs().max() / ref.abs().max()).item()
    assert err < TOL[dtype], f"relative error {err:.2e} >= {TOL[dtype]:.0e}"


def hf_logits(hf, seq: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([seq])).logits[0]


@pytest.fixture(scope="module", params=ARCHS)
def pair32(request):
    return tiny_target(request.param, dtype=torch.float32)


@pytest.fixture(scope="module", params=ARCHS)
def pair64(request):
    return tiny_target(request.param, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_batch_matches_transformers(arch, dtype):
    ours, hf = tiny_target(arch, dtype=dtype)
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(1))
    logits, _, _ = run_batch(ours, new_cache(ours, 3, 16), ids.tolist(), [0, 0, 0])
    with torch.inference_mode():
        ref = hf(ids).logits
    assert_close(logits, ref, dtype)


def test_incremental_decode_matches_full_sequence(pair32):
    ours, hf = pair32
    ref = hf_logits(hf, SEQ)
    cache = new_cache(ours, num_slots=3, capacity=32)
    slot = [1]                                       # not slot 0: slot indexing must hold
    logits, _, _ = run_batch(ours, cache, [SEQ[:6]], [0], slots=slot)
    steps = [logits[0]]
    for pos in range(6, len(SEQ)):
        cache.set_lengths(torch.tensor(slot), torch.tensor([pos]))
        logits, _, _ = run_batch(ours, cache, [[SEQ[pos]]], [pos], slots=slot)
        steps.append(logits[0])
    assert_close(torch.cat(steps), ref, torch.float32)


def test_rollback_hides_rejected_tokens(pair32):
    """Rejected draft K/V stay in the cache but past the committed length: never seen again."""
    ours, hf = pair32
    n = 8
    cache = new_cache(ours, num_slots=2, capacity=32)
    slot = torch.tensor([0])
    run_batch(ours, cache, [SEQ[:n]], [0])
    cache.set_lengths(slot, torch.tensor([n]))
    run_batch(ours, cache, [[120, 121, 122, 123, 124]], [n])        # a "draft" that gets rejected
    cache.set_lengths(slot, torch.tensor([n]))                       # roll back: only a length
    logits, _, _ = run_batch(ours, cache, [SEQ[n:n + 3]], [n])       # verify 3 true tokens at once
    cache.set_lengths(slot, torch.tensor([n + 3]))
    step, _, _ = run_batch(ours, cache, [[SEQ[n + 3]]], [n + 3])     # then one more step
    ref = hf_logits(hf, SEQ[:n + 4])
    assert_close(torch.cat([logits[0], step[0]]), ref[n:n + 4], torch.float32)


def test_ragged_batch_matches_per_prompt(pair32):
    """Right-padded prompts of different lengths in permuted slots, then a ragged decode step."""
    ours, hf = pair32
    prompts = [SEQ[:3], SEQ[2:13], SEQ[5:12]]
    slots = [2, 0, 1]
    cache = new_cache(ours, num_slots=3, capacity=32)
    logits, _, valid = run_batch(ours, cache, prompts, [0, 0, 0], slots=slots)
    cache.set_lengths(torch.tensor(slots), torch.tensor([len(p) for p in prompts]))
    nxt = [[7], [100], [42]]
    step, _, _ = run_batch(ours, cache, nxt, [len(p) for p in prompts], slots=slots)
    for b, prompt in enumerate(prompts):
        ref = hf_logits(hf, prompt + nxt[b])
        assert_close(logits[b, :len(prompt)], ref[:len(prompt)], torch.float32)
        assert_close(step[b, 0], ref[len(prompt)], torch.float32)
    assert valid.sum().item() == sum(len(p) for p in prompts)


def test_captured_features_are_hf_hidden_states(pair32):
    ours, hf = pair32
    cache = new_cache(ours, num_slots=1, capacity=32)
    _, features, _ = run_batch(ours, cache, [SEQ], [0], capture_layers=(-1, 1, 2))
    with torch.inference_mode():
        hidden = hf(torch.tensor([SEQ]), output_hidden_states=True).hidden_states
    ref = torch.cat([hidden[0], hidden[2], hidden[3]], dim=-1)
    assert features.shape == (1, len(SEQ), 3 * ours.config.hidden_size)
    assert_close(features, ref, torch.float32)


def test_greedy_decode_matches_generate(pair64):
    ours, hf = pair64
    prompt = [7, 8, 9, 10, 11, 12]
    out = greedy_decode(ours, prompt, 16, tuple(ours.config.eos_token_ids))
    assert out == hf_greedy(hf, prompt, 16)
    assert len(set(out)) > 4                        # not a degenerate repetition


def test_sliding_window_is_applied():
    """Guard against a vacuous Gemma3 test: the window must change the logits."""
    windowed, _ = tiny_target("gemma3", dtype=torch.float64)
    full, _ = tiny_target("gemma3", dtype=torch.float64, sliding_window=64)
    a, _, _ = run_batch(windowed, new_cache(windowed, 1, 32), [SEQ], [0])
    b, _, _ = run_batch(full, new_cache(full, 1, 32), [SEQ], [0])
    assert torch.equal(a[0, :4], b[0, :4])          # inside the window: identical
    assert (a[0, 4:] - b[0, 4:]).abs().max() > 1e-2  # beyond it: different


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tied_embeddings(arch):
    ours, hf = tiny_target(arch, dtype=torch.float32, tie_word_embeddings=True)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    logits, _, _ = run_batch(ours, new_cache(ours, 1, 32), [SEQ], [0])
    assert_close(logits[0], hf_logits(hf, SEQ), torch.float32)
