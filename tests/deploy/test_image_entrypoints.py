"""Each image's start, run on this machine the way its container runs it (no Docker engine
here): the Dockerfile's bake step, then its ENTRYPOINT + CMD under its ENV, from a directory
outside the source tree; /health, one completion with the official client, the HEALTHCHECK
command, and the default model already converted (no conversion at start-up).

What differs from a container, and why:
- the bind address is 127.0.0.1 and the port a free one (a shared machine), told to the
  HEALTHCHECK through ASCEND_DSPARK_SERVE_PORT as in the image;
- ASCEND_DSPARK_SERVE_DEVICE=cpu: this machine has no NPU or GPU (unchanged, the Ascend image
  refuses to start here, checked below: no silent fallback to the CPU);
- the CUDA image's server is the CPU image's: with the device set to the CPU the two run the
  same command in the same environment (less NVIDIA_*, which only the GPU runtime reads);
- CANN's set_env.sh scripts are test doubles (no CANN here) that export a marker, so the
  Ascend entrypoint is shown to source every script and exec the server in its environment;
- speculation "fixed" with 2 slots and one OpenMP thread: the "confidence" policy profiles
  step costs for 90 s on this 2-core machine at start-up (measured on the accelerator in the
  real image), and the servers share the two cores;
- PYTHONPATH points at this checkout (the image installs the same packages from its wheel).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.deploy.images import IMAGES, REPO, parse
from tests.serving.server_process import Server, free_port, stop

BAKE = "/opt/ascend-dspark/bake_default_model.py"
ON_THIS_MACHINE = {"ASCEND_DSPARK_SERVE_DEVICE": "cpu", "ASCEND_DSPARK_SERVE_SPECULATION": "fixed",
                   "ASCEND_DSPARK_SERVE_MAX_NUM_SEQS": "2", "ASCEND_DSPARK_SERVE_MAX_MODEL_LEN": "512",
                   "OMP_NUM_THREADS": "1"}
PROMPT = "The capital of France is"

pytestmark = pytest.mark.slow


def image_env(image, cache: str, **extra: str) -> dict[str, str]:
    """The process environment of a container of `image`: this machine's, less any server
    setting, plus the image's ENV; this checkout's packages and Python first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASCEND_DSPARK_SERVE_")}
    env.update(image.env)
    env.update(ASCEND_DSPARK_CACHE=cache, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.update(extra)
    return env


def start_command(image, port: int) -> list[str]:
    command = list(image.command)
    command[command.index("--host") + 1] = "127.0.0.1"
    command[command.index("--port") + 1] = str(port)
    return command


@pytest.fixture(scope="module")
def cache(smollm2_cache, tmp_path_factory):
    """The image's cache directory, filled by the Dockerfile's own bake step (run as written,
    the COPY destination mapped back to the file in this checkout): the suite's cache of the
    default model, so the conversion happens once per test session."""
    path = smollm2_cache
    bakes = {name: next(r for r in parse(name).runs if BAKE in r) for name in IMAGES}
    assert bakes["cpu"] == bakes["cuda"] == f"python {BAKE}"
    image = parse("ascend")       # the one bake line that sets something more (no torch_npu at build)
    line = bakes["ascend"].replace(BAKE, str(REPO / image.copies[BAKE]))
    proc = subprocess.run(["bash", "-c", line], env=image_env(image, path), cwd=tmp_path_factory.mktemp("home"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "default model: " + path in proc.stdout and "draft dspark: " in proc.stdout, proc.stdout
    return path


@pytest.fixture(scope="module")
def cann_doubles(tmp_path_factory) -> str:
    """Test doubles of CANN's two set_env.sh scripts: each exports one marker variable."""
    root = tmp_path_factory.mktemp("cann-double")
    scripts = []
    for name in ("toolkit", "atb"):
        script = root / name / "set_env.sh"
        script.parent.mkdir()
        script.write_text(f"# test double of CANN's {name} set_env.sh\nexport CANN_DOUBLE_{name.upper()}=sourced\n")
        scripts.append(str(script))
    return " ".join(scripts)


def effective(image) -> tuple[list[str], dict[str, str]]:
    """What a container of `image` runs here once its device is the CPU: the command and the
    ENV, less what only the GPU runtime reads (NVIDIA_*)."""
    env = {k: v for k, v in image.env.items() if not k.startswith("NVIDIA_")}
    return image.command, env | {"ASCEND_DSPARK_SERVE_DEVICE": ON_THIS_MACHINE["ASCEND_DSPARK_SERVE_DEVICE"]}


def test_the_cuda_image_runs_here_exactly_as_the_cpu_image():
    """So the CPU image's server below stands for both: with the device set to the CPU, the
    two containers would run the same command in the same environment."""
    assert effective(parse("cuda")) == effective(parse("cpu"))


@pytest.fixture(scope="module")
def servers(cache, cann_doubles, tmp_path_factory):
    """The Ascend and the CPU image's servers, started together (they share two cores), and,
    alongside, the Ascend image's command unchanged, which must refuse this NPU-less machine."""
    started, refusing = {}, None
    try:
        ascend = parse("ascend")
        refusing = subprocess.Popen(start_command(ascend, free_port()),   # ASCEND_DSPARK_SERVE_DEVICE=npu as built
                                    env=image_env(ascend, cache, CANN_SET_ENV=cann_doubles),
                                    cwd=tmp_path_factory.mktemp("refusing"), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        for name in ("ascend", "cpu"):
            image, port = parse(name), free_port()
            env = image_env(image, cache, ASCEND_DSPARK_SERVE_PORT=str(port), **ON_THIS_MACHINE)
            if name == "ascend":
                env["CANN_SET_ENV"] = cann_doubles
            log = tmp_path_factory.mktemp(name) / "server.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(start_command(image, port), env=env, cwd=log.parent, stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            started[name] = Server(port, proc, log, "default", None)
        deadline = time.monotonic() + 180
        waiting = set(started)
        while waiting:
            for name in sorted(waiting):
                server = started[name]
                if server.proc.poll() is not None:
                    raise AssertionError(f"{name}: exited {server.proc.returncode}:\n{server.log()[-3000:]}")
                try:
                    if server.health()[0] == 200:
                        waiting.discard(name)
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise AssertionError(f"not up after 180 s: {sorted(waiting)}")
            time.sleep(0.2)
        out, err = refusing.communicate(timeout=120)
        yield started, (refusing.returncode, err)
    finally:
        for server in started.values():
            stop(server.proc)
        if refusing is not None and refusing.poll() is None:
            refusing.kill()
            refusing.wait()


def test_every_image_answers_health_and_a_completion_with_its_draft(servers):
    texts = {}
    for name, server in servers[0].items():
        status, health = server.health()
        assert status == 200 and health["status"] == "ok", (name, health)
        got = server.client().completions.create(model="default", prompt=PROMPT, max_tokens=8, temperature=0)
        assert got.usage.completion_tokens == 8 and got.speculation["num_drafts"] > 0, (name, got)
        texts[name] = got.choices[0].text
        assert "converting" not in server.log(), server.log()        # baked: no conversion at start-up
    assert len(set(texts.values())) == 1, texts                      # one model, one answer


def test_the_healthcheck_command_passes_on_a_live_server_and_fails_without_one(servers, cache):
    for name, server in servers[0].items():
        image = parse(name)
        for port, expected in ((server.port, 0), (free_port(), 1)):
            env = image_env(image, cache, ASCEND_DSPARK_SERVE_PORT=str(port))
            proc = subprocess.run(image.healthcheck, env=env, capture_output=True, text=True, timeout=30)
            assert (proc.returncode != 0) == bool(expected), (name, port, proc.stderr[-2000:])


def test_the_ascend_entrypoint_runs_the_server_in_cann_s_environment(servers):
    pid = servers[0]["ascend"].proc.pid
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert b"CANN_DOUBLE_TOOLKIT=sourced" in environ and b"CANN_DOUBLE_ATB=sourced" in environ
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1].endswith(b"uvicorn")


def test_a_missing_cann_script_stops_the_ascend_container(tmp_path, cache):
    image = parse("ascend")
    env = image_env(image, cache, CANN_SET_ENV=str(tmp_path / "missing" / "set_env.sh"))
    proc = subprocess.run(image.entrypoint + ["true"], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "missing/set_env.sh" in proc.stderr, proc.stderr


def test_the_ascend_image_refuses_to_start_without_an_npu(servers):
    returncode, stderr = servers[1]
    assert returncode == 2 and "ASCEND_DSPARK_SERVE_DEVICE" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr
