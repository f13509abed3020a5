"""The built wheel outside the checkout: build, inspect, install, run. Stdlib only.

Used two ways:
- tests/test_packaging.py (in `make test`): builds the wheel and sdist and checks what they
  carry (shipped drafts, the server's static files, training configs and data) and their
  metadata (ranges, an unpinned `ascend` extra), and that pip keeps an installed older
  supported torch (a resolver dry run);
- `python -m tests.packaging_check install-check VENV` (`make test-lowest`, CI): VENV holds an
  older supported torch (2.6.0); the wheel is built, pip-installed into VENV with no torch
  constraint, torch must still be the same version afterwards, then `ascend-dspark generate`
  and the server's /health run from a directory outside the checkout.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DRAFT_KINDS = ("dspark", "dflash", "eagle3")
DRAFTS = "ascend_dspark/drafts/smollm2-135m-instruct"
STATIC = ("serving/static/index.html", "serving/static/app.js", "serving/static/style.css")
CONSTRAINTS = REPO / "constraints.txt"
LOWEST = REPO / "constraints-lowest.txt"


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return proc


def outside_env() -> dict:
    """The environment of a user's shell: nothing that points into the checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PYTEST"))}
    env["PYTHONNOUSERSITE"] = "1"
    return env


# -- build -----------------------------------------------------------------------------------
def build(out_dir: Path, python: str = sys.executable) -> tuple[Path, Path]:
    """`python -m build` (sdist, then the wheel from that sdist) of the tracked files, built from
    a copy so that nothing is written into the working tree; returns (wheel, sdist)."""
    out_dir = Path(out_dir)
    src = out_dir / "src"
    files = run(["git", "-C", REPO, "ls-files", "-z"]).stdout.split("\0")
    for name in filter(None, files):
        path = REPO / name
        if path.is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name)
    run([python, "-m", "build", "--no-isolation", "--outdir", out_dir / "dist", src], env=outside_env())
    (wheel,) = (out_dir / "dist").glob("ascend_dspark-*.whl")
    (sdist,) = (out_dir / "dist").glob("ascend_dspark-*.tar.gz")
    return wheel, sdist


def shipped_files() -> list[str]:
    """What both the wheel and the sdist must carry, relative to the package roots."""
    need = [f"{DRAFTS}/{kind}/{name}" for kind in DRAFT_KINDS
            for name in (p.name for p in (REPO / DRAFTS / kind).iterdir() if p.suffix in (".json", ".safetensors"))]
    need += list(STATIC)
    need += [str(p.relative_to(REPO)) for p in (REPO / "ascend_dspark/training/configs").glob("*.yaml")]
    need += [str(p.relative_to(REPO)) for p in (REPO / "ascend_dspark/training/data").iterdir() if p.is_file()]
    return sorted(need)


def check_dist(wheel: Path, sdist: Path) -> dict:
    """Both carry the shipped files; returns the wheel's METADATA as {field: [values]}."""
    need = shipped_files()
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(meta_name).decode()
        entry_points = zf.read(meta_name.replace("METADATA", "entry_points.txt")).decode()
    missing = [n for n in need if n not in names]
    assert not missing, f"the wheel lacks {missing}"
    assert not any(n.startswith(("tests/", "tools/")) for n in names), "tests and tools must not ship in the wheel"
    assert "serving/static/screenshot.png" not in names
    assert "ascend-dspark = serving.cli:main" in entry_points
    with tarfile.open(sdist) as tf:
        members = {m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name}
    missing = [n for n in need + ["pyproject.toml", "README.md"] if n not in members]
    assert not missing, f"the sdist lacks {missing}"
    fields: dict[str, list[str]] = {}
    for line in metadata.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(": ")
        fields.setdefault(key, []).append(value)
    return fields


# -- install and run outside ---------------------------------------------------------------
def constraints_without(names: set[str], out: Path, lowest: bool = False) -> Path:
    """constraints.txt (with constraints-lowest.txt's pins over it when `lowest`) minus `names`."""
    pins: dict[str, str] = {}
    sources = [CONSTRAINTS] + ([LOWEST] if lowest else [])
    for source in sources:
        for line in source.read_text().splitlines():
            match = re.match(r"^([A-Za-z0-9_.-]+)==", line)
            if match:
                pins[match.group(1).lower().replace("_", "-")] = line
    out.write_text("\n".join(v for k, v in pins.items() if k not in names) + "\n")
    return out


def venv_python(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


def installed_version(venv: Path, dist: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    return run([venv_python(venv), "-c", code], env=outside_env()).stdout.strip()


def install_wheel(venv: Path, wheel: Path, constraints: Path) -> None:
    """pip install WHEEL (a version already there is removed first, so a rebuilt wheel lands)."""
    pip = [venv_python(venv), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*map(str, pip), "uninstall", "-q", "-y", "ascend-dspark"], capture_output=True, check=False,
                   env=outside_env())
    run([*pip, "install", "-q", "-c", constraints, wheel], env=outside_env())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_outside(venv: Path, workdir: Path, cache: str | None = None, timeout: float = 300) -> dict:
    """From `workdir` (not the checkout): the package imports from VENV, `ascend-dspark generate`
    speculates with the shipped DSpark draft, and `ascend-dspark serve` answers /health."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = outside_env()
    if cache:
        env["ASCEND_DSPARK_CACHE"] = cache
    code = ("import ascend_dspark, serving, ops, torch; "
            "print(ascend_dspark.__file__); print(serving.__file__); print(torch.__version__)")
    where = run([venv_python(venv), "-c", code], cwd=workdir, env=env).stdout.split()
    for path in where[:2]:
        assert Path(path).resolve().is_relative_to(Path(venv).resolve()), f"imported from {path}, not the venv"
    cli = Path(venv) / "bin" / "ascend-dspark"
    gen = run([cli, "generate", "--prompt", "What is 2 + 2?", "--drafter", "dspark", "--max-tokens", "8",
               "--device", "cpu", "--temperature", "0"], cwd=workdir, env=env, timeout=timeout)
    assert "accepted" in (gen.stdout + gen.stderr), gen.stdout + gen.stderr
    port = free_port()
    log = (workdir / "serve.log").open("w")
    proc = subprocess.Popen([str(cli), "serve", "--port", str(port), "--device", "cpu", "--max-num-seqs", "2"],
                            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        status, body = None, b""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited {proc.returncode}:\n{(workdir / 'serve.log').read_text()[-3000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                resp = conn.getresponse()
                status, body = resp.status, resp.read()
                conn.close()
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert status == 200, f"/health answered {status} {body[:200]!r}:\n{(workdir / 'serve.log').read_text()[-3000:]}"
        health = json.loads(body)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    return {"ascend_dspark": where[0], "torch": where[2], "generate": gen.stdout.strip(), "health": health}


def lowest_constraints(out: Path) -> Path:
    """constraints.txt with constraints-lowest.txt's pins in place of its own (make test-lowest)."""
    return constraints_without(set(), Path(out), lowest=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("install-check", help="build, install into VENV keeping its torch, run from outside")
    check.add_argument("venv", help="a venv that already holds an older supported torch (make test-lowest)")
    write = sub.add_parser("lowest-constraints", help="write constraints.txt with the lowest pins over it")
    write.add_argument("out")
    args = parser.parse_args(argv)
    if args.command == "lowest-constraints":
        print(f"wrote {lowest_constraints(Path(args.out))}")
        return 0
    venv = Path(args.venv).resolve()
    with tempfile.TemporaryDirectory(prefix="ascend-dspark-wheel-") as tmp:
        tmp = Path(tmp)
        wheel, sdist = build(tmp, sys.executable)
        check_dist(wheel, sdist)
        before = installed_version(venv, "torch")
        # No torch constraint: pip must keep the torch it finds (transformers & co. at their lower bounds).
        install_wheel(venv, wheel, constraints_without({"torch", "triton"}, tmp / "constraints.txt", lowest=True))
        after = installed_version(venv, "torch")
        assert after == before, f"installing the wheel replaced torch {before} with {after}"
        print(f"installed {wheel.name} into {venv}: torch {before} kept, "
              f"transformers {installed_version(venv, 'transformers')}", flush=True)
        result = run_outside(venv, tmp / "elsewhere", os.environ.get("ASCEND_DSPARK_CACHE"))
        print(f"from {tmp / 'elsewhere'}: {result['generate'].splitlines()[-1]}; /health {result['health']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
