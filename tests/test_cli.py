"""The `ascend-dspark` command line, as a user runs it (in-process, on the CPU): the console
script's entry point as pyproject.toml names it, and `python -m ascend_dspark.cli`, which
is the same without `serve` (the server sits above ascend_dspark, which never imports it)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from ascend_dspark.drafters import create_drafter, load_drafter, save_drafter
from ascend_dspark.models import load_target
from tests.helpers import tiny_hf_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["ascend-dspark"]
main = getattr(importlib.import_module(SCRIPT.split(":")[0]), SCRIPT.split(":")[1])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_hf_checkpoint("qwen3", tmp_path_factory.mktemp("cli"))


@pytest.mark.parametrize("drafter", ["none", "eagle3", "dflash", "dspark"])
def test_generate_prints_text_then_one_stats_line(tiny_dir, drafter, capsys):
    code = main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--drafter", drafter,
                 "--max-tokens", "12", "--device", "cpu", "--temperature", "0"])
    out = capsys.readouterr().out.rstrip("\n").split("\n")
    assert code == 0
    stats = out[-1]
    assert "tokens/s" in stats and "mean accepted length" in stats and f"drafter {drafter}" in stats


def test_generate_with_a_saved_checkpoint_directory(tiny_dir, tmp_path, capsys):
    target, _ = load_target(tiny_dir, torch.float32, torch.device("cpu"))
    path = save_drafter(create_drafter("dspark", target), tmp_path / "draft")
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--drafter", str(path),
                 "--max-tokens", "8", "--device", "cpu", "--temperature", "0.8", "--seed", "3"]) == 0
    assert "mean accepted length" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--drafter", "medusa"], "unknown drafter 'medusa'"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--dtype", "int8"], "unknown dtype 'int8'"),
])
def test_bad_input_is_one_clear_error_line(tiny_dir, argv, message, capsys):
    args = ["generate", "--model", str(tiny_dir), "--prompt", "hi", "--device", "cpu", *argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unavailable_cuda_names_the_reason(tiny_dir, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--device", "cuda"]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_doctor_lists_every_device_kind(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert all(kind in out for kind in ("cpu", "cuda", "npu")) and "detected:" in out


def test_python_m_ascend_dspark_cli_runs_the_core_commands_and_points_serve_elsewhere():
    """Without the server: `doctor` works and imports nothing of serving/; `serve` is one
    clear line naming the command that has it."""
    probe = ("import sys; from ascend_dspark.cli import main; code = main(sys.argv[1:]); "
             "leaked = sorted(m for m in sys.modules if m == 'serving' or m.startswith('serving.')); "
             "print('serving modules:', leaked); sys.exit(code)")
    doctor = subprocess.run([sys.executable, "-c", probe, "doctor"], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    assert doctor.returncode == 0 and "detected:" in doctor.stdout and "serving modules: []" in doctor.stdout
    serve = subprocess.run([sys.executable, "-m", "ascend_dspark.cli", "serve"], cwd=ROOT, capture_output=True,
                           text=True, check=False)
    assert serve.returncode == 2 and "Traceback" not in serve.stderr
    assert "ascend-dspark serve" in serve.stderr and "python -m serving.cli serve" in serve.stderr


def test_console_script_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "{generate,doctor,serve,regen,train,eval,calibrate}" in capsys.readouterr().out


def test_calibrate_writes_temperatures_the_loader_reads(tiny_dir, tmp_path, capsys):
    target, _ = load_target(tiny_dir, torch.float32, torch.device("cpu"))
    path = save_drafter(create_drafter("dspark", target), tmp_path / "draft")
    assert main(["calibrate", "--model", str(tiny_dir), "--drafter", str(path), "--datasets", "gsm8k-train",
                 "--limit", "3", "--max-new-tokens", "12", "--device", "cpu", "--batch-size", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    temperatures = load_drafter(path, target).confidence_temperatures
    assert len(temperatures) == 7 and all(t > 0 for t in temperatures)


def test_calibrate_refuses_evaluation_sets_and_drafts_without_a_head(tiny_dir, tmp_path, capsys):
    target, _ = load_target(tiny_dir, torch.float32, torch.device("cpu"))
    dspark = save_drafter(create_drafter("dspark", target), tmp_path / "dspark")
    assert main(["calibrate", "--model", str(tiny_dir), "--drafter", str(dspark), "--datasets", "gsm8k-test",
                 "--device", "cpu"]) == 2
    assert "evaluation sets" in capsys.readouterr().err
    dflash = save_drafter(create_drafter("dflash", target), tmp_path / "dflash")
    assert main(["calibrate", "--model", str(tiny_dir), "--drafter", str(dflash), "--datasets", "gsm8k-train",
                 "--limit", "1", "--device", "cpu"]) == 2
    assert "no confidence head" in capsys.readouterr().err
