"""Target regeneration: the record format, greedy responses equal plain greedy decoding,
a killed and resumed run writes what an uninterrupted one writes, dedup, length skips,
the time budget, and the CLI entry point, on a tiny random Qwen3 with a ChatML tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from ascend_dspark.engine.engine import Engine
from ascend_dspark.models import load_target
from ascend_dspark.training.prompts import Prompt
from ascend_dspark.training.regen import chat_prompt_ids, main_regen, prompt_seed, read_records, regenerate
from tests.helpers import greedy_decode, tiny_hf_checkpoint

MAX_NEW = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_hf_checkpoint("qwen3", tmp_path_factory.mktemp("regen"))
    model, tok = load_target(path, torch.float64, "cpu")
    return path, model, tok


def _engine(model, tok, batch=3):
    return Engine(model, None, tok, max_model_len=64, max_batch_size=batch)


def _prompts():
    texts = ["What is 2+2?", "Name a colour.", "Say hi", "Count to three.", "  what IS 2+2? ",   # dup of 0
             "x" * 60, "Why is the sky blue?", "Hello there", "List two fruits."]              # 5: too long
    return [Prompt(f"t:{i}", "t", [{"role": "user", "content": t}]) for i, t in enumerate(texts)]


def _chatml_ids(text: str) -> list[int]:
    """Oracle for prompt_ids: the tiny tokenizer's vocabulary is [specials] + chars 32..126 + '\\n'."""
    vocab = {c: 5 + i for i, c in enumerate([chr(c) for c in range(32, 127)] + ["\n"])}
    im_start, im_end = 3, 4
    enc = lambda s: [vocab[c] for c in s]
    return [im_start, *enc("user\n" + text), im_end, *enc("\n"), im_start, *enc("assistant\n")]


def _by_id(path):
    return {r["id"]: r for r in read_records(path)}


def test_records_greedy_match_plain_decoding(tiny, tmp_path):
    _, model, tok = tiny
    out = tmp_path / "greedy.jsonl"
    stats = regenerate(_engine(model, tok), tok, _prompts(), out, temperature=0.0, max_new_tokens=MAX_NEW,
                       max_prompt_tokens=40, progress=False)
    recs = read_records(out)
    assert [r["id"] for r in recs] == ["t:0", "t:1", "t:2", "t:3", "t:6", "t:7", "t:8"]
    assert (stats.duplicates, stats.too_long, stats.written, stats.existing) == (1, 1, 7, 0)
    eos = tok.eos_token_ids
    for r in recs:
        text = next(p.text for p in _prompts() if p.id == r["id"])
        assert r["prompt"] == text and r["source"] == "t"
        assert r["prompt_ids"] == _chatml_ids(text)
        assert r["response_ids"] == greedy_decode(model, r["prompt_ids"], MAX_NEW, eos)
        assert r["finish_reason"] == ("stop" if r["response_ids"][-1] in eos else "length")
        assert r["seed"] == prompt_seed(r["id"])
        assert isinstance(r["response"], str)
    assert stats.generated_tokens == sum(len(r["response_ids"]) for r in recs)


def test_killed_run_resumes_to_identical_records(tiny, tmp_path, monkeypatch, caplog):
    _, model, tok = tiny
    kw = dict(temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=MAX_NEW, max_prompt_tokens=40,
              seed=5, progress=False)
    full = tmp_path / "full.jsonl"
    regenerate(_engine(model, tok), tok, _prompts(), full, **kw)

    # Kill 1: the process dies inside the second chunk's generation.
    part = tmp_path / "part.jsonl"
    eng = _engine(model, tok)
    real, calls = eng.generate, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(eng, "generate", dying)
    with pytest.raises(KeyboardInterrupt):
        regenerate(eng, tok, _prompts(), part, **kw)
    assert len(read_records(part)) == 3                    # the first chunk was written
    # Kill 2: a record half written.
    half = full.read_text().splitlines()[3]
    with open(part, "a") as f:
        f.write(half[: len(half) // 2])
    with caplog.at_level("WARNING"):
        resumed = regenerate(_engine(model, tok, batch=2), tok, _prompts(), part, **kw)   # other batching
    assert "truncated last line" in caplog.text
    assert resumed.existing == 3 and resumed.written == 4
    assert _by_id(part) == _by_id(full)
    assert all(line.startswith("{") for line in part.read_text().splitlines())    # the stub was cut off
    # A third run has nothing left to do.
    again = regenerate(_engine(model, tok), tok, _prompts(), part, **kw)
    assert again.written == 0 and again.existing == 7 and again.duplicates == 1


def test_budget_stop_resumes_into_the_same_batches(tiny, tmp_path, monkeypatch):
    """Chunks come from the prompt list, so a clean stop + resume forms the batches of the
    uninterrupted run (what makes bf16 GPU runs bit-reproducible), skipped prompts included."""
    _, model, tok = tiny
    kw = dict(max_new_tokens=2, max_prompt_tokens=40, progress=False)
    prompts = _prompts()
    prompts.insert(0, prompts.pop(5))                     # the too-long prompt in the first chunk

    def batches(path, **extra):
        eng, seen = _engine(model, tok), []
        real = eng.generate
        monkeypatch.setattr(eng, "generate", lambda ids, params: seen.append(ids) or real(ids, params))
        regenerate(eng, tok, prompts, path, **kw, **extra)
        return seen

    whole = batches(tmp_path / "whole.jsonl")
    first = batches(tmp_path / "cut.jsonl", time_budget_s=0.0)
    rest = batches(tmp_path / "cut.jsonl")
    assert [len(b) for b in whole] == [2, 3, 2] and first + rest == whole
    assert _by_id(tmp_path / "cut.jsonl") == _by_id(tmp_path / "whole.jsonl")


def test_prompts_are_templated_with_thinking_off():
    """A Qwen3-style template that reads `enable_thinking` gets the empty think block."""
    from ascend_dspark.models.tokenizer import Tokenizer
    from tests.helpers import tiny_tokenizer

    hf = tiny_tokenizer()
    hf.chat_template += ("{% if add_generation_prompt and enable_thinking is defined and not enable_thinking %}"
                         "<think></think>\n{% endif %}")            # (Qwen3's has blank lines)
    ids = chat_prompt_ids(Tokenizer(hf), [{"role": "user", "content": "Hi"}])
    assert ids == _chatml_ids("Hi") + [5 + ord(c) - 32 if c != "\n" else 5 + 95 for c in "<think></think>\n"]


def test_truncated_tail_warns_and_corruption_raises(tmp_path, caplog):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "resp')
    with caplog.at_level("WARNING"):
        assert [r["id"] for r in read_records(path)] == ["a", "b"]
    assert "truncated last line" in caplog.text
    assert path.read_text().endswith('"resp')                # read-only unless repair
    read_records(path, repair=True)
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    path.write_text('{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(ValueError, match=r"r.jsonl: line 2 is not a JSON record"):
        read_records(path)


def test_seeds_change_samples_and_dedup_against_file(tiny, tmp_path):
    _, model, tok = tiny
    kw = dict(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=MAX_NEW, max_prompt_tokens=40, progress=False)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    regenerate(_engine(model, tok), tok, _prompts(), a, seed=0, **kw)
    regenerate(_engine(model, tok), tok, _prompts(), b, seed=1, **kw)
    ra, rb = _by_id(a), _by_id(b)
    assert ra.keys() == rb.keys()
    assert any(ra[k]["response_ids"] != rb[k]["response_ids"] for k in ra)
    # The same text under a new id is a duplicate of a record already in the file.
    new = [Prompt("u:9", "u", [{"role": "user", "content": "SAY   hi"}])]
    s = regenerate(_engine(model, tok), tok, new, a, seed=0, **kw)
    assert (s.duplicates, s.written) == (1, 0)


def test_time_budget_stops_after_a_chunk(tiny, tmp_path):
    _, model, tok = tiny
    out = tmp_path / "t.jsonl"
    s = regenerate(_engine(model, tok), tok, _prompts(), out, temperature=0.0, max_new_tokens=MAX_NEW,
                   max_prompt_tokens=40, time_budget_s=0.0, progress=False)
    assert s.stopped_early and s.written == 3 and len(read_records(out)) == 3


def test_bad_configuration_is_refused(tiny, tmp_path):
    _, model, tok = tiny
    with pytest.raises(ValueError, match="max_model_len"):
        regenerate(_engine(model, tok), tok, _prompts(), tmp_path / "x.jsonl", max_new_tokens=60,
                   max_prompt_tokens=40, progress=False)


def test_cli_entry_point(tiny, tmp_path, capsys):
    """Build the mix without a model (--prompts-out), regenerate from the file (what the GPU
    machine runs), then run again: resumed, nothing new."""
    path, _, _ = tiny
    mix = tmp_path / "mix.jsonl"
    assert main_regen(["--sources", "code,gsm8k-train", "--limit-per-source", "3", "--prompts-out", str(mix)]) == 0
    rows = [json.loads(line) for line in mix.read_text().splitlines()]
    assert [r["id"].split(":")[0] for r in rows] == ["code", "gsm8k-train"] * 3
    assert all(r["messages"][0]["role"] == "user" for r in rows)
    out = tmp_path / "cli.jsonl"
    argv = ["--model", str(path), "--prompts", str(mix), "--out", str(out), "--max-new-tokens", "3",
            "--max-model-len", "1200", "--batch-size", "6", "--device", "cpu", "--dtype", "float32", "--no-progress"]
    capsys.readouterr()
    assert main_regen(argv) == 0
    recs = read_records(out)
    assert {r["id"] for r in recs} <= {r["id"] for r in rows} and len(recs) >= 4
    assert all(0 < len(r["response_ids"]) <= 3 for r in recs)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["written"] == len(recs)
    assert main_regen(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 0
    with pytest.raises(ValueError, match="--out"):
        main_regen(["--model", str(path), "--prompts", str(mix), "--device", "cpu"])


# -- several samples per prompt (issue 19) ----------------------------------------------------------
def _seed_oracle(record_id: str, seed: int) -> int:
    """The documented per-sample seed: sha256("<run seed>:<record id>"), first 8 bytes little-endian, >> 1."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{record_id}".encode()).digest()[:8], "little") >> 1


def test_several_samples_per_prompt(tiny, tmp_path):
    """ids P#k; sample 0 is the greedy answer, the others sampled at the temperature with
    their own seeds; a sample depends only on (prompt, sample seed): the same records come
    from another batching, another chunking, and from a run over one prompt alone."""
    _, model, tok = tiny
    prompts = [p for p in _prompts() if p.id in ("t:0", "t:1", "t:6")]
    kw = dict(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=MAX_NEW, max_prompt_tokens=40, seed=3,
              samples_per_prompt=3, progress=False)
    full = tmp_path / "full.jsonl"
    stats = regenerate(_engine(model, tok), tok, prompts, full, **kw)
    recs = read_records(full)
    assert [r["id"] for r in recs] == [f"{p.id}#{k}" for p in prompts for k in range(3)]
    assert stats.written == 9 and stats.duplicates == 0
    eos = tok.eos_token_ids
    for r in recs:
        prompt_id, k = r["id"].split("#")
        assert (r["prompt_id"], r["sample"]) == (prompt_id, int(k))
        assert r["seed"] == _seed_oracle(r["id"], 3)
        assert r["temperature"] == (0.0 if k == "0" else 1.0)
        if k == "0":
            assert r["response_ids"] == greedy_decode(model, r["prompt_ids"], MAX_NEW, eos)
    by = _by_id(full)
    assert any(by[f"{p.id}#1"]["response_ids"] != by[f"{p.id}#2"]["response_ids"] for p in prompts)

    other = tmp_path / "other.jsonl"
    regenerate(_engine(model, tok, batch=2), tok, prompts, other, chunk_size=4, **kw)
    assert _by_id(other) == by
    alone = tmp_path / "alone.jsonl"
    regenerate(_engine(model, tok, batch=1), tok, prompts[1:2], alone, **kw)
    assert _by_id(alone) == {k: v for k, v in by.items() if k.startswith("t:1#")}


def test_several_samples_resume_after_a_kill(tiny, tmp_path, monkeypatch):
    _, model, tok = tiny
    prompts = [p for p in _prompts() if p.id in ("t:0", "t:1", "t:2", "t:3")]
    kw = dict(temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=MAX_NEW, max_prompt_tokens=40, seed=1,
              samples_per_prompt=2, chunk_size=3, progress=False)
    full = tmp_path / "full.jsonl"
    regenerate(_engine(model, tok), tok, prompts, full, **kw)
    part = tmp_path / "part.jsonl"
    eng = _engine(model, tok)
    real, calls = eng.generate, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(eng, "generate", dying)
    with pytest.raises(KeyboardInterrupt):
        regenerate(eng, tok, prompts, part, **kw)
    assert [r["id"] for r in read_records(part)] == ["t:0#0", "t:0#1", "t:1#0"]     # one chunk of 3 requests
    resumed = regenerate(_engine(model, tok), tok, prompts, part, **kw)
    assert resumed.existing == 3 and resumed.written == 5
    assert _by_id(part) == _by_id(full)
    # More samples later: only the new ones are generated, the old ones are kept.
    more = regenerate(_engine(model, tok), tok, prompts, part, **{**kw, "samples_per_prompt": 3})
    assert more.written == 4 and more.existing == 8
    assert {k: v for k, v in _by_id(part).items() if not k.endswith("#2")} == _by_id(full)


def test_cli_several_samples_and_shards(tiny, tmp_path, capsys):
    from ascend_dspark.training.dataset import load_samples
    from ascend_dspark.training.prompts import save_prompts

    path, _, _ = tiny
    mix = tmp_path / "mix.jsonl"
    save_prompts([p for p in _prompts() if p.id in ("t:0", "t:1")], mix)
    out, shards = tmp_path / "cli.jsonl", tmp_path / "shards"
    argv = ["--model", str(path), "--prompts", str(mix), "--out", str(out), "--max-new-tokens", "3",
            "--max-model-len", "64", "--batch-size", "4", "--samples-per-prompt", "2", "--shards", str(shards),
            "--device", "cpu", "--dtype", "float32", "--no-progress"]
    assert main_regen(argv) == 0
    packed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert packed["records"] == 4 and packed["files"] == 1
    a, b = load_samples([out], 64), load_samples([shards], 64)
    assert [s.id for s in a] == [s.id for s in b] == ["t:0#0", "t:0#1", "t:1#0", "t:1#1"]
    assert all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.loss_mask, y.loss_mask) for x, y in zip(a, b))
    assert [s.prompt_id for s in b] == ["t:0", "t:0", "t:1", "t:1"]
    assert [s.prompt_key for s in a] == [s.prompt_key for s in b] and all(s.prompt_key for s in b)
