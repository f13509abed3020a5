"""The trainer learns, resumes bit for bit, and N torchrun ranks step like one process.

A tiny random target (tests/helpers.py) regenerates its own short responses (greedy
continuations of random prompts), so the drafts have something real to learn: the
target's distribution over its own text.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ascend_dspark.platform import make_platform
from ascend_dspark.training.config import TrainConfig, load_config
from ascend_dspark.training.dataset import load_samples
from ascend_dspark.training.trainer import Trainer, checkpoints

from tests.helpers import greedy_decode, tiny_hf_checkpoint

LAYERS = [0, 1, 2]
DRAFTERS = {
    "dspark": dict(num_layers=1, block_size=4, markov_rank=8, confidence_head=True, target_layer_ids=LAYERS),
    "dflash": dict(num_layers=1, block_size=4, anchor_first=True, target_layer_ids=LAYERS),
    "eagle3": dict(ttt_length=4, target_layer_ids=LAYERS),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(target dir, regen JSONL, loaded float32 target) of a tiny Llama."""
    from ascend_dspark.models import load_target

    root = tmp_path_factory.mktemp("tiny-train")
    target_dir = tiny_hf_checkpoint("llama", root)
    target, _ = load_target(str(target_dir), torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    data = root / "regen.jsonl"
    with data.open("w") as f:
        for i in range(24):
            prompt = torch.randint(5, 128, (int(torch.randint(4, 9, (1,), generator=gen)),), generator=gen).tolist()
            response = greedy_decode(target, prompt, 24)
            f.write(json.dumps({"id": f"s{i}", "source": "synthetic", "prompt_ids": prompt,
                                "response_ids": response, "finish_reason": "length"}) + "\n")
    return target_dir, data, target


def _config(algorithm: str, **overrides) -> TrainConfig:
    raw = dict(algorithm=algorithm, drafter=DRAFTERS[algorithm], steps=40, batch_size=4, lr=3e-3,
               warmup_ratio=0.1, num_anchors=8, precision="fp32", log_every=1, checkpoint_every=1000)
    raw.update(overrides)
    return TrainConfig.from_dict(raw)


@pytest.mark.parametrize("algorithm", list(DRAFTERS))
def test_loss_falls_and_expected_accepted_length_rises(tiny, tmp_path, algorithm):
    _, data, target = tiny
    cfg = _config(algorithm, steps=80)
    trainer = Trainer(cfg, target, load_samples([data], 64), tmp_path, make_platform("cpu"), progress=False)
    logs = [trainer.train_step() for _ in range(cfg.steps)]
    first, last = logs[:5], logs[-5:]
    mean = lambda rows, f: sum(f(r) for r in rows) / len(rows)       # noqa: E731
    assert mean(last, lambda r: r.loss) < 0.9 * mean(first, lambda r: r.loss)
    assert mean(last, lambda r: r.metrics["tau_prob"]) > mean(first, lambda r: r.metrics["tau_prob"]) + 0.1


def test_resumed_run_is_bit_identical(tiny, tmp_path):
    _, data, target = tiny
    cfg = _config("dspark", steps=6)
    samples = load_samples([data], 64)
    straight = Trainer(cfg, target, samples, tmp_path / "a", make_platform("cpu"), progress=False)
    straight.train()

    first = Trainer(cfg, target, samples, tmp_path / "b", make_platform("cpu"), progress=False)
    for _ in range(3):
        first.train_step()
    saved = first.save_checkpoint()
    torch.manual_seed(1234)                           # the resumed process starts from other RNG state
    second = Trainer(cfg, target, samples, tmp_path / "b", make_platform("cpu"), progress=False)
    second.resume(saved)
    assert second.step == 3
    second.train()
    for (name, a), b in zip(straight.drafter.state_dict().items(), second.drafter.state_dict().values()):
        assert torch.equal(a, b), name
    assert [p.name for p in checkpoints(tmp_path / "b")] == ["step_0000003", "step_0000006"]


def test_two_gloo_ranks_match_one_process(tiny, tmp_path):
    """`torchrun --nproc-per-node 2` with batch 2 per rank == one process with batch 4."""
    target_dir, data, _ = tiny
    cfg = {"algorithm": "dspark", "target": str(target_dir), "drafter": DRAFTERS["dspark"], "steps": 3,
           "lr": 3e-3, "num_anchors": 8, "precision": "fp32", "checkpoint_every": 3, "data": [str(data)]}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    common = ["-m", "ascend_dspark.cli", "train", "--config", str(path), "--device", "cpu", "--no-progress"]
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one"), "--set", "batch_size=4"],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *common, "--out", str(tmp_path / "two"), "--set", "batch_size=2"],
                         capture_output=True, text=True, timeout=300, env={**_env(), "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr
    a = load_file(str(tmp_path / "one" / "step_0000003" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "step_0000003" / "model.safetensors"))
    # Adam turns float-rounding differences of near-zero gradients into lr-sized steps, so
    # the bound is on the largest difference; a real difference in data moves weights ~lr.
    gap = max(float((a[n] - b[n]).abs().max()) for n in a)
    assert gap < 1e-4
    # negative control: one process on half the global batch ends visibly elsewhere
    half = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "half"), "--set", "batch_size=2"],
                          capture_output=True, text=True, timeout=300)
    assert half.returncode == 0, half.stderr
    c = load_file(str(tmp_path / "half" / "step_0000003" / "model.safetensors"))
    assert max(float((a[n] - c[n]).abs().max()) for n in a) > 1e-3


def test_config_errors_are_clear(tiny, tmp_path):
    _, data, target = tiny
    with pytest.raises(ValueError, match="unknown key"):
        TrainConfig.from_dict({"algorithm": "dspark", "stpes": 3})
    with pytest.raises(ValueError, match="algorithm"):
        TrainConfig.from_dict({"algorithm": "medusa"})
    cfg = _config("dspark", drafter={**DRAFTERS["dspark"], "target_layer_ids": [0, 7]})
    with pytest.raises(ValueError, match="target_layer_ids"):
        Trainer(cfg, target, load_samples([data], 64), tmp_path, make_platform("cpu"), progress=False)


def test_numbers_written_without_a_dot_are_numbers():
    """YAML 1.1 reads `4e-4` as a string; in a float field it is the number (a GPU run's
    `--set lr=4e-4` once died in the optimiser), and a word is still refused."""
    assert load_config("dspark_smollm2", ["lr=4e-4", "weight_decay=1e-2"]).lr == 0.0004
    assert TrainConfig.from_dict({"algorithm": "dflash", "lr": "2e-4"}).lr == 0.0002
    with pytest.raises(ValueError, match="lr must be a number"):
        load_config("dspark_smollm2", ["lr=fast"])


def test_shipped_configs_load_and_agree():
    """One recipe: the shipped SmolLM2 configs share data length, steps, batch and target layers."""
    cfgs = {name: load_config(name) for name in
            ("dspark_smollm2", "dflash_smollm2", "eagle3_smollm2", "dspark_gated_smollm2", "dspark_rnn_smollm2")}
    assert len({(c.max_len, c.steps, c.batch_size, tuple(c.drafter["target_layer_ids"])) for c in cfgs.values()}) == 1
    assert cfgs["dspark_smollm2"].loss_weights == {"ce": 0.1, "tv": 0.9, "conf": 1.0}
    assert cfgs["dflash_smollm2"].loss_weights == {"ce": 1.0}
    assert {c.drafter.get("markov_head_type") for n, c in cfgs.items() if n.startswith("dspark")} == {
        "vanilla", "gated", "rnn"}


def _env() -> dict:
    import os

    return dict(os.environ)


def test_offline_feature_cache_trains_like_online(tiny, tmp_path):
    """Reading the target's outputs from the offline cache trains like computing them online
    (up to float rounding: the cache ran the target in other batches), and a cache built
    from other data is refused."""
    from ascend_dspark.training.batch import CachedTargetOutputs
    from ascend_dspark.training.feature_cache import FeatureCache, write_feature_cache

    _, data, target = tiny
    cfg = _config("dspark", steps=4)
    samples = load_samples([data], 64)
    write_feature_cache(target, samples, tmp_path / "cache", LAYERS, samples_per_shard=5, progress=False)
    cached = CachedTargetOutputs(FeatureCache(tmp_path / "cache", target, LAYERS), keep_shards=2)
    online = Trainer(cfg, target, samples, tmp_path / "a", make_platform("cpu"), progress=False)
    offline = Trainer(cfg, target, samples, tmp_path / "b", make_platform("cpu"), progress=False, cached_outputs=cached)
    for _ in range(cfg.steps):
        online.train_step()
        offline.train_step()
    gap = max(float((a - b).abs().max()) for a, b in
              zip(online.drafter.state_dict().values(), offline.drafter.state_dict().values()))
    assert gap < 1e-4

    shorter = load_samples([data], 16)                 # same ids, other tokens (cut shorter)
    other = Trainer(cfg, target, shorter, tmp_path / "c", make_platform("cpu"), progress=False, cached_outputs=cached)
    with pytest.raises(ValueError, match="other tokens"):
        other.train_step()
