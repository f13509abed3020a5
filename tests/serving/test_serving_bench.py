"""benchmarks/serve_bench.py end to end, as it will be run elsewhere: `--launch` starts the
server itself (the tiny model), then a second one with `--drafter none` for the plain mode;
its own HTTP client streams every request to the end; the numbers it reports agree with
what the server counted; the JSON and the plot are written and `--combine` joins runs."""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from types import SimpleNamespace

import pytest

from tests.serving.server_process import MAX_MODEL_LEN, REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import serve_bench

MAX_TOKENS = 8


def test_sweep_launching_its_own_servers(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")            # the launched servers inherit it
    out = tmp_path / "sweep.json"
    rc = serve_bench.main(["--launch", "--concurrency", "1", "3", "--num-prompts", "3", "--max-tokens", str(MAX_TOKENS),
                           "--request-rate", "inf", "200",
                           "--dataset", "gsm8k-test", "--max-prompt-chars", "120", "--warmup", "0",
                           "--modes", "spec", "nospec", "fixed", "plain",
                           "--slo-ttft-ms", "60000", "--slo-tpot-ms", "0.001", "--out", str(out), "--",
                           "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32",
                           "--max-model-len", str(MAX_MODEL_LEN), "--served-model-name", "tiny"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000
    meta, rows = result["meta"], result["results"]
    assert meta["model"] == "tiny" and meta["dataset"] == "gsm8k-test"
    assert meta["servers"]["spec"]["drafter"] == "dspark" and meta["servers"]["spec"]["num_speculative_tokens"] == 7
    assert meta["servers"]["plain"]["drafter"] == "none" and meta["servers"]["plain"]["num_speculative_tokens"] == 0
    assert meta["servers"]["plain"]["launched_with"][-2:] == ["--drafter", "none"]
    assert meta["servers"]["fixed"]["launched_with"][-2:] == ["--speculation", "fixed"]
    assert [(r["mode"], r["concurrency"]) for r in rows] == [
        ("spec", 1), ("spec", 3), ("nospec", 1), ("nospec", 3), ("fixed", 1), ("fixed", 3), ("plain", 1), ("plain", 3)]
    assert [r["request_rate"] for r in rows] == [None, 200.0] * 4
    for r in rows:
        assert r["completed"] == 3 and r["failed"] == 0, r["errors"]
        assert r["total_output_tokens"] == 3 * MAX_TOKENS                 # ignore_eos: every request is full length
        assert r["output_throughput"] == pytest.approx(r["total_output_tokens"] / r["duration_s"])
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert 0 < r[key]["p50"] <= r[key]["p99"], (key, r[key])
        assert r["ttft_ms"]["p99"] <= r["e2el_ms"]["p99"]
        assert r["goodput"] == 0                                        # nobody meets a 1 us TPOT
        assert "2" in r["server_gc"] and r["server_gc"]["2"]["collections"] >= 0   # the server's GC pauses, read
        spec = r["server_speculation"]
        assert spec["generation_tokens"] == 3 * MAX_TOKENS                # the server counted the same tokens
        lengths = spec["verify_length_counts"]
        assert sum(lengths) == spec["num_verify_steps"]
        if r["mode"] == "fixed":                                      # K every step
            assert spec["num_drafts"] > 0 and spec["num_draft_tokens"] == 7 * spec["num_drafts"]
            assert lengths == [0] * 7 + [spec["num_verify_steps"]]
        elif r["mode"] == "spec":                                     # the confidence policy: 0..K
            assert spec["num_draft_tokens"] <= 7 * spec["num_drafts"]
            assert spec["drafter_sleeps"] >= 0                        # read from /speculation
        else:
            assert spec["num_drafts"] == 0 and spec["mean_accepted_length"] == 1.0
    for kind in ("spec", "fixed", "plain"):                          # every server stopped cleanly
        log = (tmp_path / f"sweep.{kind}.server.log").read_text()
        assert "Traceback" not in log, log[-3000:]

    # --combine: two runs' results as one file and one plot
    joined = tmp_path / "joined.json"
    assert serve_bench.main(["--combine", str(out), str(out), "--out", str(joined)]) == 0
    both = json.loads(joined.read_text())
    assert len(both["results"]) == 2 * len(rows) and len(both["meta"]["commands"]) == 2
    assert joined.with_suffix(".png").exists()


@pytest.mark.parametrize("rate", [40.0, float("inf")])
def test_poisson_arrivals_under_a_concurrency_cap(monkeypatch, rate):
    """Requests go out as a Poisson stream: the gaps between arrivals (while slots are free)
    average 1 / rate and vary like an exponential's (coefficient of variation ~1); never more
    than the cap are in flight. The infinite rate is the control: everything arrives at once."""
    sends, in_flight, peak = [], [0], [0]

    async def fake_request(url, model, messages, args, speculate):
        sends.append(time.perf_counter())
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        await asyncio.sleep(0.001)
        in_flight[0] -= 1
        return serve_bench.Record(ok=True)

    monkeypatch.setattr(serve_bench, "one_request", fake_request)
    records, _ = asyncio.run(serve_bench.run_level("http://x", "m", [[]] * 200, 4, SimpleNamespace(seed=3),
                                                   True, rate))
    assert len(records) == 200 and peak[0] <= 4
    gaps = [b - a for a, b in zip(sends, sends[1:])]
    if rate == float("inf"):
        assert sum(gaps) < 0.5 * 200 / 40.0                 # not spread out like the Poisson stream
    else:
        assert statistics.mean(gaps) == pytest.approx(1 / rate, rel=0.25)
        assert 0.7 < statistics.stdev(gaps) / statistics.mean(gaps) < 1.3
