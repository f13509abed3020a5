"""A real server for the serving tests: `python -m uvicorn serving.app:app` in a child
process on a free loopback port, configured through ASCEND_DSPARK_SERVE_* variables, as a
user would run it. `running_server` starts it, waits for /health and stops it with SIGTERM
(uvicorn's graceful shutdown), killing it only if it hangs.

Plain HTTP (bad bodies, headers) goes through http.client so the tests depend on nothing
beyond the standard library and the official `openai` client.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
API_KEY = "serving-test-key"
MAX_MODEL_LEN = 256          # the tiny test model's max_position_embeddings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    port: int
    proc: subprocess.Popen
    log_path: Path
    model: str
    api_key: str | None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str | None = None, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=api_key or self.api_key or "unused", max_retries=0,
                      timeout=kwargs.pop("timeout", 60), **kwargs)

    def async_client(self, **kwargs):
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key or "unused", max_retries=0,
                           timeout=kwargs.pop("timeout", 60), **kwargs)

    def request(self, method: str, path: str, body: bytes | str | dict | None = None,
                headers: dict | None = None, auth: bool = True, timeout: float = 30) -> tuple[int, dict, bytes]:
        """(status, headers, body) of one plain HTTP request."""
        if isinstance(body, dict):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if auth and self.api_key:
            hdrs.setdefault("Authorization", f"Bearer {self.api_key}")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body=None, **kwargs) -> tuple[int, dict]:
        status, _, raw = self.request(method, path, body, **kwargs)
        return status, json.loads(raw)

    def health(self) -> tuple[int, dict]:
        return self.json("GET", "/health")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_idle(self, timeout: float = 20.0) -> dict:
        """The engine accounting once nothing runs: every block and slot free (or fail)."""
        deadline = time.monotonic() + timeout
        while True:
            status, body = self.health()
            e = body["engine"]
            idle = (e["running"] == 0 and e["waiting"] == 0 and e["in_flight"] == 0 and e["kv_blocks_used"] == 0
                    and e["free_slots"] == e["slots_total"])
            if status == 200 and idle and e["accounting_ok"]:
                return e
            if time.monotonic() > deadline:
                raise AssertionError(f"engine not idle after {timeout} s: {body}")
            time.sleep(0.05)


def server_env(model: str, threads: int | None = 1, **settings) -> dict[str, str]:
    """Settings for a CPU server. One torch thread by default: the tiny models gain nothing
    from more, and on a shared 2-core machine a second spinning OpenMP thread per process
    makes every step wait on the other processes (10x slower steps)."""
    env = {"ASCEND_DSPARK_SERVE_MODEL": str(model), "ASCEND_DSPARK_SERVE_DEVICE": "cpu",
           "ASCEND_DSPARK_SERVE_DTYPE": "float32"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update({"ASCEND_DSPARK_SERVE_" + k.upper(): str(v) for k, v in settings.items()})
    return env


def launch(env: dict[str, str], log_path: Path, port: int | None = None) -> tuple[subprocess.Popen, int]:
    port = port or free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("ASCEND_DSPARK_SERVE_")}
    full.update(env)
    full["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "wb") as log:          # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "serving.app:app", "--host", "127.0.0.1",
                                 "--port", str(port), "--timeout-graceful-shutdown", "10"],
                                cwd=REPO, env=full, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return proc, port


@contextlib.contextmanager
def running_server(env: dict[str, str], log_path: Path, startup_timeout: float = 120.0) -> Iterator[Server]:
    proc, port = launch(env, log_path)
    server = Server(port, proc, log_path, env.get("ASCEND_DSPARK_SERVE_SERVED_MODEL_NAME",
                                                   env["ASCEND_DSPARK_SERVE_MODEL"]),
                    env.get("ASCEND_DSPARK_SERVE_API_KEY"))
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} during start-up:\n{server.log()[-4000:]}")
            try:
                if server.health()[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not up after {startup_timeout} s:\n{server.log()[-4000:]}")
            time.sleep(0.1)
        yield server
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
