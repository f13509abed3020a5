"""Prompt sets: real files from the pinned packages and the shared data dir, first turns only,
seeded subsets, the train/eval disjointness guard and the balanced training mix."""

from __future__ import annotations

import gzip
import json

import pytest

from ascend_dspark.training import prompts as P
from ascend_dspark.training.prompts import Prompt, assert_disjoint, load_prompts, normalize, training_mix

# Sizes stated in the project data README (shared/data/README.md) (ShareGPT: 17,671 whole records, of which the
# `_0` pieces starting with a human turn are conversations' first turns).
SIZES = {"gsm8k-train": 7473, "gsm8k-test": 1319, "humaneval": 164, "mtbench": 80}


def _well_formed(p: Prompt, source: str) -> None:
    assert p.source == source and p.id.startswith(source + ":")
    assert len(p.messages) == 1 and set(p.messages[0]) == {"role", "content"}
    assert p.messages[0]["role"] == "user"
    assert isinstance(p.text, str) and p.text.strip()


@pytest.mark.parametrize("name", list(P.SOURCES))
def test_every_set_is_nonempty_and_well_formed(name):
    prompts = load_prompts(name)
    assert len(prompts) > 0
    for p in prompts:
        _well_formed(p, name)
    assert len({p.id for p in prompts}) == len(prompts)
    if name in SIZES:
        assert len(prompts) == SIZES[name]


def test_first_turns_match_the_raw_files():
    """Oracle: the files read directly with the stdlib, independently of the loader."""
    he = P.package_file(*P.HUMANEVAL)
    with gzip.open(he, "rt") as f:
        first = json.loads(f.readline())
    assert load_prompts("humaneval")[0].text == first["prompt"]

    with open(P.package_file(*P.MTBENCH)) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    mt = load_prompts("mtbench")
    assert [p.text for p in mt] == [r["turns"][0].strip() for r in rows]
    assert all(r["turns"][1].strip() not in {p.text for p in mt} for r in rows)   # no second turns

    with gzip.open(P.shared_data_dir() / "gsm8k_test.jsonl.gz", "rt") as f:
        q0 = json.loads(f.readline())["question"]
    assert load_prompts("gsm8k-test")[0].text == q0.strip()


def test_sharegpt_reads_a_truncated_array(tmp_path):
    """The packaged file ends mid-record: whole records come back, the cut one is dropped."""
    records = [{"id": f"r{i}_0", "conversations": [{"from": "human", "value": f"question {i} " + "x" * 50}]}
               for i in range(40)]
    text = json.dumps(records, indent=2)
    cut = text[: text.index('"r39_0"') + 10]                  # inside the last record
    (tmp_path / "a.json").write_text(cut)
    got = list(P.iter_json_array(tmp_path / "a.json", chunk_chars=97))    # records straddle chunks
    assert got == records[:39]
    (tmp_path / "b.json").write_text(text)                   # a complete file works too
    assert list(P.iter_json_array(tmp_path / "b.json", chunk_chars=64)) == records


def test_sharegpt_prompts_are_first_human_turns():
    prompts = load_prompts("sharegpt")
    assert len(prompts) > 9000                               # ~9.4k conversations start with a human turn
    assert all(p.id.endswith("_0") for p in prompts)
    by_id = {p.id: p.text for p in prompts}
    # The package file's first record, seen with `head`: a Product Launch Formula question.
    assert by_id["sharegpt:QWJhYvA_0"].startswith("Summarize the main ideas of Jeff Walker's Product Launch Formula")


def test_code_prompts_come_from_stdlib_docstrings():
    import json as json_module
    import textwrap

    prompts = {p.id: p.text for p in load_prompts("code")}
    assert len(prompts) > 1000
    assert all(t.startswith(("Write a Python function `", "Write a Python method `")) for t in prompts.values())
    # json.dumps: signature and docstring read with inspect, not with the loader's ast walk.
    import inspect
    doc = textwrap.dedent(inspect.getdoc(json_module.dumps)).split("\n\n")[0]
    expected_tail = " ".join(doc.split())[len("Serialize"):]
    text = prompts["code:json.dumps"]
    assert text.startswith("Write a Python function `dumps(obj, *, skipkeys=False")
    assert text.endswith("that serializes" + expected_tail)
    assert load_prompts("code") == load_prompts("code")                # deterministic


def test_limit_is_a_seeded_subset():
    full = {p.id for p in load_prompts("gsm8k-train")}
    a, b, c = (load_prompts("gsm8k-train", limit=50, seed=s) for s in (0, 0, 1))
    assert [p.id for p in a] == [p.id for p in b] and len(a) == 50
    assert [p.id for p in a] != [p.id for p in c]
    assert {p.id for p in a} <= full
    with pytest.raises(ValueError, match="unknown prompt set"):
        load_prompts("alpaca")


def test_assert_disjoint_fires_on_overlap():
    ev = load_prompts("mtbench")[:3]
    train = load_prompts("gsm8k-train", limit=20)
    assert_disjoint(train, ev)                                   # no overlap: silent
    leaked = Prompt("sharegpt:x_0", "sharegpt", [{"role": "user", "content": "  " + ev[1].text.upper() + "\n"}])
    with pytest.raises(ValueError, match=r"1 training prompts are evaluation prompts: sharegpt:x_0 == mtbench:"):
        assert_disjoint(train + [leaked], ev)
    assert normalize(" A\tb \n C ") == "a b c"


def test_training_sets_are_disjoint_from_eval_sets():
    assert_disjoint([p for n in P.TRAIN_SETS for p in load_prompts(n)], P.eval_prompts())


def test_training_mix_round_robin_and_guarded(monkeypatch):
    mix = training_mix(limit_per_source=4, seed=3)
    assert [p.source for p in mix] == list(P.TRAIN_SETS) * 4
    assert [p.id for p in mix] == [p.id for p in training_mix(limit_per_source=4, seed=3)]
    assert [p.id for p in mix] != [p.id for p in training_mix(limit_per_source=4, seed=4)]
    # A source that runs out drops out of the rotation.
    short = training_mix(limit_per_source=None, seed=0, sources=("sharegpt", "code"))
    n_code = len(load_prompts("code"))
    assert [p.source for p in short[: 2 * n_code]] == ["sharegpt", "code"] * n_code
    assert {p.source for p in short[2 * n_code:]} == {"sharegpt"}
    # The disjointness guard is applied: leak an eval prompt into a training source.
    leaked = load_prompts("humaneval")[7]
    real = P._load_all("gsm8k-train")
    monkeypatch.setitem(P.SOURCES, "gsm8k-train", lambda: [*real, Prompt("gsm8k-train:leak", "gsm8k-train",
                                                                           leaked.messages)])
    P._load_all.cache_clear()
    try:
        with pytest.raises(ValueError, match="gsm8k-train:leak == humaneval:HumanEval/7"):
            training_mix(limit_per_source=None, seed=0, sources=("gsm8k-train",))
    finally:
        P._load_all.cache_clear()


def test_shared_data_dir_error_names_both_locations(monkeypatch, tmp_path):
    monkeypatch.setenv(P.DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere.*ASCEND_DSPARK_DATA=.*default .*training/data"):
        P.shared_data_dir()
    monkeypatch.setenv(P.DATA_ENV, str(tmp_path))
    assert P.shared_data_dir() == tmp_path
