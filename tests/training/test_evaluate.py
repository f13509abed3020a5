"""`evaluate`: report structure, tau against a hand count over the engine's own outputs,
the table, the plots (and their absence without matplotlib), and the CLI entry point.

A tiny float64 target and a drafter double that knows the target's greedy continuation:
at T=0 it is accepted wherever it plants the truth, so rounds accept 0..K drafts; the
tokenizer's EOS is chosen so that one request ends on an EOS *inside* an accepted block,
where DeepSpec's tau (no bonus) and the engine's mean accepted length (bonus) differ.
"""

from __future__ import annotations

import json
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

from ascend_dspark.drafters.base import DraftProposal
from ascend_dspark.engine.engine import Engine
from ascend_dspark.models.tokenizer import Tokenizer
from ascend_dspark.spec.sampling import SamplingParams
from ascend_dspark.training import plots
from ascend_dspark.training.evaluate import (evaluate, main_eval, markdown_table, parse_drafters, prompt_ids,
                                             write_report)
from tests.helpers import tiny_target, tiny_tokenizer

K = 4
MAX_NEW = 20
SEED = 5
PROMPTS = [SimpleNamespace(id="a:0", source="toy-a", messages=[{"role": "user", "content": "What is 2+2?"}]),
           SimpleNamespace(id="a:1", source="toy-a", messages=[{"role": "user", "content": "Say hi."}]),
           SimpleNamespace(id="b:0", source="toy-b", messages=[{"role": "user", "content": "List three colours"}])]


class GreedyOracle:
    """TEST DOUBLE: finds its prompt at prefill (by the observed prompt tokens), drafts the
    target's greedy continuation except at one hashed position per round (a wrong token),
    one-hot probabilities, confidences a fixed function of position."""

    target_layer_ids = ()
    max_draft_tokens = K

    def __init__(self, table, vocab, with_confidence=True):
        self.table, self.vocab, self.with_confidence = table, vocab, with_confidence
        self.current: dict[int, list[int]] = {}

    lookahead = 0

    def attach(self, tables, dtype=None):
        pass

    def reset(self, slot_ids):
        pass

    def observe(self, slot_ids, features, positions, next_tokens, counts, ctx=None):
        for b, slot in enumerate(slot_ids.tolist()):
            if int(positions[b, 0]) == 0:                        # prefill: tokens 1..n of the prompt + first
                n = int(counts[b])
                seen = next_tokens[b, : n - 1].tolist()
                self.current[slot] = next(full for prompt, full in self.table
                                          if len(prompt) == n and prompt[1:] == seen)

    def propose(self, slot_ids, anchors, anchor_positions, num_tokens, sampling, ctx=None):
        tokens = torch.zeros(len(slot_ids), num_tokens, dtype=torch.long)
        conf = torch.zeros(len(slot_ids), num_tokens)
        for b, (slot, pos) in enumerate(zip(slot_ids.tolist(), anchor_positions.tolist())):
            seq = self.current[slot]
            wrong = (5 * pos + 3 * len(seq)) % (num_tokens + 3)
            for k in range(num_tokens):
                truth = seq[pos + 1 + k] if pos + 1 + k < len(seq) else 0
                tokens[b, k] = truth if k != wrong else (truth + 1) % self.vocab
                conf[b, k] = ((pos + 3 * k) % 15 + 1) / 16
        probs = torch.zeros(len(slot_ids), num_tokens, self.vocab).scatter_(-1, tokens.unsqueeze(-1), 1.0)
        return DraftProposal(tokens=tokens, probs=probs, confidence=conf if self.with_confidence else None)


def hand_tau(outputs) -> float:
    """DeepSpec's tau from the outputs: a request that ended on a stop token committed all its
    tokens but the prefill's in its rounds (an EOS draft ends the round, no bonus); one cut by
    max_tokens committed every round's accepted drafts + bonus."""
    committed = sum(len(o.token_ids) - 1 if o.finish_reason == "stop" else sum(o.stats.accepted_lengths)
                    for o in outputs)
    return committed / sum(o.stats.num_steps for o in outputs)


@pytest.fixture(scope="module")
def setup():
    target, _ = tiny_target("llama", dtype=torch.float64)
    base = Tokenizer(tiny_tokenizer())
    ids = [prompt_ids(base, p) for p in PROMPTS]
    plain = Engine(target, None, max_model_len=96, max_batch_size=3)
    refs = plain.generate(ids, SamplingParams(temperature=0.0, max_tokens=MAX_NEW + K + 2, ignore_eos=True))
    table = [(p, p + r.token_ids) for p, r in zip(ids, refs)]
    # An EOS that the first prompt's greedy output meets as an accepted draft, not the bonus.
    for eos in dict.fromkeys(refs[0].token_ids[2:MAX_NEW]):
        tokenizer = Tokenizer(tiny_tokenizer(), eos_token_ids=[eos])
        engine = Engine(target, GreedyOracle(table, target.config.vocab_size), tokenizer, K,
                        max_model_len=96, max_batch_size=2, speculation="fixed")      # the protocol's full blocks
        out = engine.generate(ids[:1], SamplingParams(temperature=0.0, max_tokens=MAX_NEW))[0]
        if out.finish_reason == "stop" and len(out.token_ids) - 1 < sum(out.stats.accepted_lengths):
            return target, table, tokenizer, engine, ids
    raise AssertionError("no EOS candidate lands inside an accepted block: change the planting rule")


@pytest.fixture(scope="module")
def report(setup):
    _, _, tokenizer, engine, _ = setup
    return evaluate(engine, tokenizer, PROMPTS, (0.0, 1.0), MAX_NEW, batch_size=2, seed=SEED, drafter_name="oracle")


def test_report_has_one_row_per_dataset_and_temperature(report):
    rows = report["results"]
    assert [(r["dataset"], r["temperature"]) for r in rows] == [("toy-a", 0.0), ("toy-a", 1.0),
                                                                ("toy-b", 0.0), ("toy-b", 1.0)]
    for r in rows:
        assert r["drafter"] == "oracle" and r["num_speculative_tokens"] == K
        assert r["num_samples"] == (2 if r["dataset"] == "toy-a" else 1)
        assert len(r["accept_rate"]) == len(r["conditional_acceptance"]) == K
        for view in ("survival", "conditional"):
            assert set(r["calibration"][view]["summary"]) == {"ece", "auroc", "brier", "mean_pred", "mean_label", "count"}
    assert report["config"]["temperatures"] == [0.0, 1.0] and report["config"]["datasets"] == ["toy-a", "toy-b"]


def test_tau_equals_a_hand_count_over_the_engine_outputs(setup, report):
    _, _, _, engine, ids = setup
    groups = {"toy-a": ids[:2], "toy-b": ids[2:]}
    eos_inside_a_block = False
    for row in report["results"]:
        group = groups[row["dataset"]]
        params = [SamplingParams(temperature=row["temperature"], max_tokens=MAX_NEW, seed=SEED + i)
                  for i in range(len(group))]
        outputs = engine.generate(group, params)
        assert row["tau"] == pytest.approx(hand_tau(outputs))
        assert row["rounds"] == sum(o.stats.num_steps for o in outputs)
        engine_tau = sum(sum(o.stats.accepted_lengths) for o in outputs) / row["rounds"]
        eos_inside_a_block |= row["tau"] < engine_tau - 1e-12
    assert eos_inside_a_block                    # the EOS convention was really exercised


def test_strict_json_markdown_and_plots(report, tmp_path):
    paths = write_report(report, tmp_path)
    loaded = json.loads((tmp_path / "eval.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert len(loaded["results"]) == 4
    table = (tmp_path / "eval.md").read_text().splitlines()
    assert table[0].startswith("| dataset | drafter | T | samples | tau | tau 95% CI | acc@0")
    assert sum(line.startswith("| toy-") for line in table) == 4
    pngs = {"acceptance_toy-a.png", "acceptance_toy-b.png", "reliability_oracle.png"}
    assert {p.name for p in paths} == {"eval.json", "eval.md", *pngs}
    for name in pngs:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    redraw = tmp_path / "redraw"
    assert plots.main([str(tmp_path / "eval.json"), "--out", str(redraw)]) == 0
    assert {p.name for p in redraw.iterdir()} == pngs


def test_without_matplotlib_one_warning_and_no_plots(report, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setattr(plots, "_warned", False)
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        first = write_report(report, tmp_path / "a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = write_report(report, tmp_path / "b")
    assert [p.name for p in first] == [p.name for p in second] == ["eval.json", "eval.md"]
    assert not [w for w in caught if "matplotlib" in str(w.message)]


def test_a_drafter_without_confidences_has_no_calibration(setup, tmp_path):
    target, table, tokenizer, _, _ = setup
    engine = Engine(target, GreedyOracle(table, target.config.vocab_size, with_confidence=False), tokenizer, K,
                    max_model_len=96, max_batch_size=1, speculation="fixed")
    rep = evaluate(engine, tokenizer, PROMPTS[2:], (0.0,), MAX_NEW, drafter_name="plain-oracle")
    assert rep["results"][0]["calibration"] is None
    assert markdown_table(rep).splitlines()[2].endswith("| - | - | - | - |")
    assert [p.name for p in write_report(rep, tmp_path)] == ["eval.json", "eval.md", "acceptance_toy-b.png"]


def test_parse_drafters():
    assert parse_drafters("dspark=ckpt/a, dflash=ckpt/b,eagle3") == {"dspark": "ckpt/a", "dflash": "ckpt/b",
                                                                     "eagle3": "eagle3"}
    with pytest.raises(ValueError, match="twice"):
        parse_drafters("a=x,a=y")


def test_cli_loads_the_target_once_for_every_drafter(tmp_path, monkeypatch, capsys):
    import ascend_dspark.models as models
    import ascend_dspark.training.prompts as prompt_sets
    from ascend_dspark.drafters import create_drafter, save_drafter
    from tests.helpers import tiny_hf_checkpoint

    model_dir = tiny_hf_checkpoint("qwen3", tmp_path)
    target, _ = models.load_target(model_dir, torch.float32, torch.device("cpu"))
    draft_dir = save_drafter(create_drafter("dspark", target), tmp_path / "draft")
    loads = []
    real_load = models.load_target
    monkeypatch.setattr(models, "load_target", lambda *a, **kw: loads.append(a) or real_load(*a, **kw))
    monkeypatch.setattr(prompt_sets, "load_prompts",
                        lambda name, limit=None, seed=0: [prompt_sets.Prompt(f"{name}:{i}", name, p.messages)
                                                          for i, p in enumerate(PROMPTS[:limit])])
    selected = tmp_path / "prompts.jsonl"
    assert main_eval(["--datasets", "s1,s2", "--limit", "2", "--prompts-out", str(selected)]) == 0
    assert not loads and len(selected.read_text().splitlines()) == 4      # no model for selecting prompts
    out = tmp_path / "eval"
    with pytest.warns(UserWarning, match="randomly initialised dflash"):
        code = main_eval(["--model", str(model_dir), "--drafters", f"dspark={draft_dir},dflash",
                          "--prompts", str(selected), "--temperatures", "0,1", "--max-new-tokens", "6",
                          "--device", "cpu", "--out", str(out)])
    assert code == 0 and len(loads) == 1
    rep = json.loads((out / "eval.json").read_text())
    assert [(r["drafter"], r["dataset"], r["temperature"]) for r in rep["results"]] == [
        (d, s, t) for d in ("dspark", "dflash") for s in ("s1", "s2") for t in (0.0, 1.0)]
    assert rep["results"][0]["calibration"] is not None and rep["results"][-1]["calibration"] is None
    assert (out / "eval.md").exists() and (out / "reliability_dspark.png").exists()
    assert "| s1 | dspark | 0 | 2 |" in capsys.readouterr().out
