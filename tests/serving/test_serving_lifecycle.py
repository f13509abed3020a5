"""Server life cycle as an operator sees it: bad settings stop it at once with a message,
overload is a fast 429, a request past its deadline is stopped, and SIGTERM lets running
streams finish before the process exits cleanly (through `ascend-dspark serve`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from serving.cli import main
from tests.serving.server_process import (
    MAX_MODEL_LEN,
    REPO,
    Server,
    free_port,
    running_server,
    server_env,
    stop,
)

LONG = {"model": "tiny", "prompt": "a long one", "max_tokens": 100, "temperature": 0, "ignore_eos": True}


def _uvicorn_with(env: dict[str, str]) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith("ASCEND_DSPARK_SERVE_")} | env
    return subprocess.Popen([sys.executable, "-m", "uvicorn", "serving.app:app", "--port", str(free_port())],
                            cwd=REPO, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_bad_settings_stop_the_server_at_once_naming_the_variable(tmp_path):
    wrong_type = _uvicorn_with({"ASCEND_DSPARK_SERVE_MAX_NUM_SEQS": "many"})
    wrong_values = _uvicorn_with({"ASCEND_DSPARK_SERVE_DRAFTER": "medusa", "ASCEND_DSPARK_SERVE_DEVICE": "tpu",
                                  "ASCEND_DSPARK_SERVE_MODEL": str(tmp_path / "missing"),
                                  "ASCEND_DSPARK_SERVE_QUEUE_SIZE": "-1", "ASCEND_DSPARK_SERVE_DTYPE": "int4"})
    _, err = wrong_type.communicate(timeout=60)
    assert wrong_type.returncode == 2 and "Traceback" not in err
    assert "ASCEND_DSPARK_SERVE_MAX_NUM_SEQS must be an integer, got 'many'" in err
    _, err = wrong_values.communicate(timeout=60)
    assert wrong_values.returncode == 2 and "Traceback" not in err
    for needle in ("ASCEND_DSPARK_SERVE_DRAFTER", "'medusa'", "ASCEND_DSPARK_SERVE_DEVICE", "unknown device 'tpu'",
                   "ASCEND_DSPARK_SERVE_MODEL", "missing", "ASCEND_DSPARK_SERVE_QUEUE_SIZE", "'int4'"):
        assert needle in err, err


def test_cli_serve_refuses_bad_flags_in_one_line(capsys):
    assert main(["serve", "--max-num-seqs", "0", "--drafter", "medusa"]) == 2
    err = capsys.readouterr().err
    assert "--max-num-seqs" in err and "--drafter" in err and "Traceback" not in err


def test_overload_is_a_fast_429_and_the_admitted_requests_finish(tiny_model_dir, tmp_path):
    env = server_env(tiny_model_dir, max_model_len=MAX_MODEL_LEN, max_num_seqs=1, queue_size=1,
                     served_model_name="tiny", drafter="none")
    with running_server(env, tmp_path / "server.log") as server:
        results = []

        def call():
            t0 = time.monotonic()
            status, headers, body = server.request("POST", "/v1/completions", LONG)
            results.append((status, time.monotonic() - t0, headers, json.loads(body)))

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
            time.sleep(0.01)
        for t in threads:
            t.join(60)
        statuses = sorted(r[0] for r in results)
        assert statuses.count(200) >= 2 and statuses.count(429) >= 1 and set(statuses) <= {200, 429}, statuses
        for status, elapsed, headers, body in results:
            if status == 429:
                assert elapsed < 2.0 and headers["retry-after"] == "1"
                assert body["error"]["code"] == "queue_full" and "capacity" in body["error"]["message"]
            else:
                assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 100
        server.wait_idle()
        assert server.request("POST", "/v1/completions", {**LONG, "max_tokens": 4})[0] == 200


def test_a_request_past_its_deadline_is_stopped_and_freed(tiny_model_dir, tmp_path):
    env = server_env(tiny_model_dir, max_model_len=MAX_MODEL_LEN, request_timeout_s=0.05, served_model_name="tiny")
    with running_server(env, tmp_path / "server.log") as server:
        status, body = server.json("POST", "/v1/completions", {**LONG, "max_tokens": 240})
        assert status == 408 and body["error"]["code"] == "timeout", body
        _, _, raw = server.request("POST", "/v1/completions", {**LONG, "max_tokens": 240, "stream": True})
        events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "timeout"
        server.wait_idle()


def test_sigterm_lets_running_streams_finish_then_exits_cleanly(tiny_model_dir, tmp_path):
    """Started with `ascend-dspark serve` flags (no environment), stopped with SIGTERM mid-stream."""
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--model", str(tiny_model_dir),
                                 "--device", "cpu", "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
                                 "--port", str(port), "--served-model-name", "tiny", "--shutdown-grace-s", "20"],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1"})
    server = Server(port, proc, log, "tiny", None)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, server.log()
            try:
                if server.health()[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        stream = server.client().completions.create(model="tiny", prompt="go", max_tokens=120, temperature=0,
                                                     stream=True, extra_body={"ignore_eos": True})
        text, reason = "", None
        for i, chunk in enumerate(stream):
            if i == 1:
                proc.send_signal(signal.SIGTERM)
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        assert reason == "length" and len(text) > 0
        # uvicorn re-raises the signal it shut down for, once shutdown is complete
        assert proc.wait(30) in (0, -signal.SIGTERM)
        log = server.log()
        assert "Application shutdown complete" in log and "Traceback" not in log, log
    finally:
        stop(proc)


def test_settings_flags_win_over_environment_over_defaults(caplog):
    import argparse

    from serving.config import ServerConfig, add_arguments, from_args

    assert ServerConfig.from_env({}).host == "127.0.0.1"          # loopback unless told otherwise
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    env = {"ASCEND_DSPARK_SERVE_MAX_NUM_SEQS": "3", "ASCEND_DSPARK_SERVE_QUEUE_SIZE": "5",
           "ASCEND_DSPARK_SERVE_API_KEY": "from-the-env-123"}
    config = from_args(parser.parse_args(["--queue-size", "9", "--host", "0.0.0.0"]), env)
    assert (config.max_num_seqs, config.queue_size, config.capacity, config.api_key) == (3, 9, 12, "from-the-env-123")
    with caplog.at_level("WARNING", logger="serving.config"):
        config.validate()
        assert not caplog.records
        ServerConfig(host="0.0.0.0").validate()
    assert "without an API key" in caplog.text


def test_boolean_settings_take_a_flag_pair_and_spelled_out_environment_values():
    import argparse

    from serving.config import ConfigError, ServerConfig, add_arguments, from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert from_args(parser.parse_args([]), {}).prefill_graphs is None            # the engine decides
    assert from_args(parser.parse_args(["--prefill-graphs"]), {}).prefill_graphs is True
    env = {"ASCEND_DSPARK_SERVE_PREFILL_GRAPHS": "off"}
    assert from_args(parser.parse_args([]), env).prefill_graphs is False
    assert from_args(parser.parse_args(["--prefill-graphs"]), env).prefill_graphs is True   # the flag wins
    assert from_args(parser.parse_args(["--no-prefill-graphs"]), {}).prefill_graphs is False
    with pytest.raises(ConfigError, match="ASCEND_DSPARK_SERVE_PREFILL_GRAPHS must be one of"):
        ServerConfig.from_env({"ASCEND_DSPARK_SERVE_PREFILL_GRAPHS": "maybe"})


def test_served_model_name_takes_several_aliases():
    import argparse

    from serving.config import ServerConfig, add_arguments, from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = from_args(parser.parse_args(["--served-model-name", "smol", "smollm2"]), {})
    assert config.model_names == ["smol", "smollm2"] and config.model_name == "smol"
    env = {"ASCEND_DSPARK_SERVE_SERVED_MODEL_NAME": "a, b"}
    assert from_args(parser.parse_args([]), env).model_names == ["a", "b"]
    assert from_args(parser.parse_args(["--served-model-name", "c"]), env).model_names == ["c"]
    assert ServerConfig(model="default").model_names == ["default"]
