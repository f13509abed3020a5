"""Evaluation reports made separately (the shipped drafts beside training, the new ones after)
merge into one, with paired ratios across them; mismatched settings or a drafter twice refuse."""

from __future__ import annotations

import pytest

from ascend_dspark.training.evaluate import merge_reports, parse_ratios, tau_ratios


def _report(names, max_new_tokens=256):
    rows = [{"dataset": "gsm8k-test", "drafter": n, "temperature": 0.0, "tau": 2.0,
             "per_prompt": {"committed": [4 + i, 6], "rounds": [2, 3]}} for i, n in enumerate(names)]
    config = {"temperatures": [0.0], "max_new_tokens": max_new_tokens, "seed": 0, "datasets": ["gsm8k-test"],
              "drafters": {n: f"/d/{n}" for n in names}}
    return {"protocol": "p", "config": config, "results": rows}


def test_merge_then_ratio():
    merged = merge_reports([_report(["base_dspark"]), _report(["new_dspark"])])
    assert [r["drafter"] for r in merged["results"]] == ["base_dspark", "new_dspark"]
    assert set(merged["config"]["drafters"]) == {"base_dspark", "new_dspark"}
    (ratio,) = tau_ratios(merged, parse_ratios("new_dspark/base_dspark"))
    assert ratio["ratio"] == pytest.approx(1.0)           # both (4 + 6) / (2 + 3): i = 0 in each report
    with pytest.raises(ValueError, match="max_new_tokens"):
        merge_reports([_report(["a"]), _report(["b"], max_new_tokens=128)])
    with pytest.raises(ValueError, match="two reports"):
        merge_reports([_report(["a"]), _report(["a"])])
    with pytest.raises(ValueError, match="NAME/NAME"):
        parse_ratios("a-b")
