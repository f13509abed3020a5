"""Training that adds up across GPU runs (issue 19): a draft exported with its progress
continues its schedule from the weights alone; DSpark and DFlash train jointly on the same
batches with one target forward; validation on held-out prompts is logged and does not
disturb training; large drafts are written as safetensors shards."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from ascend_dspark.drafters import load_drafter
from ascend_dspark.platform import make_platform
from ascend_dspark.training.block_objective import validation_metrics
from ascend_dspark.training.config import TrainConfig
from ascend_dspark.training.dataset import load_samples
from ascend_dspark.training.split import split_samples
from ascend_dspark.training.joint import JointTrainer, fitted_steps
from ascend_dspark.training.trainer import Trainer, read_progress

from tests.helpers import greedy_decode, tiny_hf_checkpoint

LAYERS = [0, 1, 2]
DSPARK = dict(num_layers=1, block_size=4, markov_rank=8, confidence_head=True, target_layer_ids=LAYERS)
DFLASH = dict(num_layers=1, block_size=4, anchor_first=True, target_layer_ids=[0, 2])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(target dir, regen JSONL with 2 samples for each of 30 prompts, float32 target)."""
    from ascend_dspark.models import load_target

    root = tmp_path_factory.mktemp("tiny-continue")
    target_dir = tiny_hf_checkpoint("llama", root)
    target, _ = load_target(str(target_dir), torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    data = root / "regen.jsonl"
    with data.open("w") as f:
        for i in range(30):
            prompt = torch.randint(5, 128, (int(torch.randint(4, 9, (1,), generator=gen)),), generator=gen).tolist()
            response = greedy_decode(target, prompt, 20)
            for k in range(2):
                f.write(json.dumps({"id": f"q:{i}#{k}", "prompt_id": f"q:{i}", "source": "synthetic",
                                    "prompt": f"question {i}", "prompt_ids": prompt,
                                    "response_ids": response[: 20 - 4 * k], "finish_reason": "length"}) + "\n")
    return target_dir, data, target


def _cfg(algorithm="dspark", **kw):
    raw = dict(algorithm=algorithm, drafter=DSPARK if algorithm == "dspark" else DFLASH, steps=10, batch_size=4,
               lr=3e-3, warmup_ratio=0.1, num_anchors=8, precision="fp32", log_every=1, checkpoint_every=1000,
               rewarm_steps=2, val_every=3, val_batches=2)
    raw.update(kw)
    return TrainConfig.from_dict(raw)


def _cosine_lr(step, steps=10, warmup=1, lr=3e-3):
    """Oracle: linear warmup over `warmup` steps, then cosine from lr to 0 at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


def test_weights_only_continuation_continues_the_schedule(tiny, tmp_path):
    _, data, target = tiny
    cpu = make_platform("cpu")
    samples = load_samples([data], 64)
    first = Trainer(_cfg(), target, samples, tmp_path / "a", cpu, progress=False)
    lrs = [first.train_step().lr for _ in range(4)]
    assert lrs == pytest.approx([_cosine_lr(s) for s in range(4)])
    export = first.export(tmp_path / "export")
    progress = read_progress(export)
    assert (progress["step"], progress["steps"], progress["finished"], progress["algorithm"]) == (4, 10, False, "dspark")
    assert progress["samples_seen_total"] == 16
    stored = load_file(str(export / "model.safetensors"))
    for name, p in first.drafter.state_dict().items():
        assert stored[name].dtype == torch.bfloat16 and torch.equal(stored[name], p.to(torch.bfloat16)), name

    # The next "GPU run": new data order, nothing but the exported directory.
    second = Trainer(_cfg(), target, samples[::-1], tmp_path / "b", cpu, init_from=export, progress=False)
    assert (second.step, second.start_step) == (4, 4)
    for name, p in second.drafter.state_dict().items():
        assert torch.equal(p, stored[name].float()), name
    assert not second.optimizer.state                              # a fresh optimiser
    logs = [second.train_step() for _ in range(6)]
    rewarm = [min(1.0, (s - 4 + 1) / 2) for s in range(4, 10)]     # rewarm_steps = 2
    assert [e.lr for e in logs] == pytest.approx([_cosine_lr(s) * r for s, r in zip(range(4, 10), rewarm)])
    assert [e.step for e in logs] == list(range(5, 11))
    done = second.export(tmp_path / "export2")
    assert read_progress(done)["finished"] and read_progress(done)["samples_seen_total"] == 40

    with pytest.raises(ValueError, match="raise `steps`"):
        Trainer(_cfg(), target, samples, tmp_path / "c", cpu, init_from=done, progress=False)
    longer = Trainer(_cfg(steps=20), target, samples, tmp_path / "d", cpu, init_from=done, progress=False)
    assert longer.step == 10
    fresh = Trainer(_cfg(), target, samples, tmp_path / "e", cpu, init_from=done, progress=False,
                    continue_schedule=False)
    assert fresh.step == 0 and fresh.lr_at(0) == pytest.approx(_cosine_lr(0))
    with pytest.raises(ValueError, match="dflash"):
        Trainer(_cfg("dflash"), target, samples, tmp_path / "f", cpu, init_from=done, progress=False)


def test_joint_training_equals_training_each_alone(tiny, tmp_path):
    """One target forward at the union of the layers serves both drafters: each ends with
    exactly the weights it reaches trained alone on the same batches."""
    _, data, target = tiny
    cpu = make_platform("cpu")
    samples = load_samples([data], 64)
    alone = {}
    for algo in ("dspark", "dflash"):
        t = Trainer(_cfg(algo, steps=3), target, samples, tmp_path / f"alone-{algo}", cpu, progress=False)
        t.train()
        alone[algo] = t.drafter.state_dict()
    members = [Trainer(_cfg(a, steps=3), target, samples, tmp_path / f"joint-{a}", cpu, progress=False)
               for a in ("dspark", "dflash")]
    joint = JointTrainer(members)
    assert joint.layer_ids == (0, 1, 2)
    forwards = []
    real = target.forward
    target.forward = lambda *a, **k: forwards.append(1) or real(*a, **k)
    try:
        joint.train()
    finally:
        del target.forward
    assert len(forwards) == 3                                        # once per step, for both
    for m in members:
        for name, p in m.drafter.state_dict().items():
            assert torch.equal(p, alone[m.cfg.algorithm][name]), (m.cfg.algorithm, name)
        assert (m.out_dir / "step_0000003").is_dir()
    with pytest.raises(ValueError, match="batch_size"):
        JointTrainer([Trainer(_cfg(steps=3), target, samples, tmp_path / "x", cpu, progress=False),
                      Trainer(_cfg("dflash", steps=3, batch_size=2), target, samples, tmp_path / "y", cpu,
                              progress=False)])


def test_validation_is_logged_and_leaves_training_alone(tiny, tmp_path):
    _, data, target = tiny
    cpu = make_platform("cpu")
    train, val = split_samples(load_samples([data], 64), 0.25)
    assert val and {s.prompt_id for s in val}.isdisjoint({s.prompt_id for s in train})
    cfg = dict(steps=7, val_every=3)
    with_val = Trainer(_cfg(**cfg), target, train, tmp_path / "v", cpu, progress=False, val_samples=val)
    with_val.train()
    without = Trainer(_cfg(**cfg), target, train, tmp_path / "n", cpu, progress=False)
    without.train()
    for (name, a), b in zip(with_val.drafter.state_dict().items(), without.drafter.state_dict().values()):
        assert torch.equal(a, b), name
    lines = [json.loads(x) for x in (tmp_path / "v" / "train_log.jsonl").read_text().splitlines()]
    vals = [x for x in lines if "val" in x]
    assert [x["step"] for x in vals] == [0, 3, 6, 7]              # the start is the baseline
    for x in vals:
        v = x["val"]
        assert 0 <= v["accept@1"] <= 1 and 0 <= v["argmax@1"] <= 1 and v["slots"] > 0
        slots = sum(k.startswith("accept@") for k in v)
        assert slots == with_val.drafter.max_draft_tokens
        assert v["tau_prob"] == pytest.approx(1 + sum(math.prod(v[f"accept@{i}"] for i in range(1, k + 1))
                                                      for k in range(1, slots + 1)))
    assert not any("val" in x for x in (tmp_path / "n" / "train_log.jsonl").read_text().splitlines())


def test_validation_metrics_pool_sums():
    sums = {"accept": torch.tensor([3.0, 1.0], dtype=torch.float64), "argmax": torch.tensor([4.0, 2.0]),
            "count": torch.tensor([4.0, 2.0])}
    m = validation_metrics(sums)
    assert (m["accept@1"], m["accept@2"], m["argmax@1"], m["argmax@2"]) == (0.75, 0.5, 1.0, 1.0)
    assert m["tau_prob"] == pytest.approx(1 + 0.75 + 0.375) and m["tau_argmax"] == pytest.approx(3.0)
    assert m["slots"] == 6


def test_fitted_steps():
    assert fitted_steps(100.0, 10.0, 0.5) == 171                  # (100 - 10) * 0.95 / 0.5
    assert fitted_steps(100.0, 120.0, 0.5) == 1
    assert fitted_steps(100.0, 10.0, 0.0) == 1


def test_large_drafts_are_written_as_shards(tiny, tmp_path):
    from ascend_dspark.training.export import save_drafter_sharded

    _, data, target = tiny
    t = Trainer(_cfg(), target, load_samples([data], 64), tmp_path / "r", make_platform("cpu"), progress=False)
    state = {k: v.to(torch.bfloat16) for k, v in t.drafter.state_dict().items()}
    total = sum(v.numel() * 2 for v in state.values())
    limit = total // 3 + 1
    out = save_drafter_sharded(t.drafter, tmp_path / "sharded", torch.bfloat16, limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted({f for f in index["weight_map"].values()})
    n = len(files)
    assert n >= 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists() and index["metadata"]["total_size"] == total
    read = {}
    for f in files:
        part = load_file(str(out / f))
        biggest = max(v.numel() * 2 for v in part.values())
        assert sum(v.numel() * 2 for v in part.values()) <= max(limit, biggest)
        read.update(part)
    assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)
    # Small enough: one model.safetensors, stale shards and index removed.
    save_drafter_sharded(t.drafter, out, torch.bfloat16)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert load_drafter(out, target) is not None


def test_cli_joint_run_then_continue(tiny, tmp_path, capsys):
    """`train --config A --config B` trains both on the same batches into --out/NAME and
    --export/NAME; the next run `--init-from NAME=export/NAME` continues each schedule."""
    import yaml

    from ascend_dspark.training.cli import add_train_parser

    target_dir, data, _ = tiny
    configs = {}
    for name, algo in (("ds", "dspark"), ("df", "dflash")):
        raw = _cfg(algo, steps=4, val_fraction=0.2, val_every=2).to_dict()
        raw.update(target=str(target_dir))
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(raw))

    def run(*extra):
        parser = argparse.ArgumentParser()
        add_train_parser(parser.add_subparsers(dest="cmd"))
        args = parser.parse_args(["train", "--config", str(configs["ds"]), "--config", str(configs["df"]),
                                  "--data", str(data), "--device", "cpu", "--no-progress", *extra])
        return args.func(args)

    assert run("--out", str(tmp_path / "run1"), "--export", str(tmp_path / "exp1"), "--set", "steps=2") == 0
    for name in ("ds", "df"):
        assert read_progress(tmp_path / "exp1" / name)["step"] == 2
        lines = (tmp_path / "run1" / name / "train_log.jsonl").read_text().splitlines()
        assert any('"val"' in x for x in lines)
    assert run("--out", str(tmp_path / "run2"), "--export", str(tmp_path / "exp2"),
               "--init-from", f"ds={tmp_path / 'exp1' / 'ds'}", "--init-from", f"df={tmp_path / 'exp1' / 'df'}") == 0
    out = capsys.readouterr().out
    assert "dspark: step 4/4" in out and "dflash: step 4/4" in out
    for name in ("ds", "df"):
        p = read_progress(tmp_path / "exp2" / name)
        assert p["step"] == 4 and p["finished"]
        steps = [json.loads(x)["step"] for x in (tmp_path / "run2" / name / "train_log.jsonl").read_text().splitlines()
                 if '"loss"' in x]
        assert steps == [3, 4]
    with pytest.raises(ValueError, match="NAME=DIR"):
        run("--out", str(tmp_path / "run3"), "--init-from", str(tmp_path / "exp1" / "ds"))
