"""Schema fuzzing: schemathesis reads the server's own /openapi.json and throws generated
requests at every operation, valid ones (every field within its documented bounds) and
invalid ones (wrong types, out-of-range values, missing or extra fields), against a real
uvicorn process serving the tiny model with an API key.

What must hold for every request: no 5xx (the server never fails on input, and no stack
trace reaches a client, nor the server log), every answer is one the schema documents (its
status code, its content type, its body: the error shape, and each event of a stream), and
an invalid request is refused with a 4xx.

Bounded: a fixed number of examples per operation and generation mode, the engine's
lengths kept short (max_model_len 64), so the module takes about 20 s on two cores.
"""

from __future__ import annotations

import os
import time

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the test extra: pip install -e '.[test]'")

from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode, checks

from tests.serving.server_process import API_KEY, running_server, server_env

# Examples per generation operation and mode; CI runs a fixed (derandomized) set. For a longer
# exploration: ASCEND_DSPARK_FUZZ_EXAMPLES=500 (random examples, a new set each run).
SCALE = int(os.environ.get("ASCEND_DSPARK_FUZZ_EXAMPLES", "0"))
EXAMPLES = {GenerationMode.POSITIVE: SCALE or 20, GenerationMode.NEGATIVE: (SCALE or 20) * 2 // 3}
# Valid requests as generated, valid requests made streaming (with usage), invalid requests.
VARIANTS = [(GenerationMode.POSITIVE, False), (GenerationMode.POSITIVE, True), (GenerationMode.NEGATIVE, False)]
GENERATION_OPS = ("POST /v1/completions", "POST /v1/chat/completions")
CHECKS = [getattr(checks, name) for name in ("not_a_server_error", "status_code_conformance",
                                             "content_type_conformance", "response_schema_conformance", "negative_data_rejection")]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    env = server_env(tiny_model_dir, max_model_len=64, max_num_seqs=4, queue_size=4, max_n=4, api_key=API_KEY,
                     served_model_name="tiny", request_timeout_s=20, max_body_bytes=65536)
    with running_server(env, tmp_path_factory.mktemp("log") / "server.log") as srv:
        yield srv
    log = srv.log()
    assert "Traceback" not in log and "unhandled error" not in log, log[-6000:]


def test_no_server_errors_and_answers_match_the_schema(server):
    # read whole streams (schemathesis stops after 20 events by default): every event is checked
    config = schemathesis.Config.from_dict({"max-stream-events": 100_000})
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", config=config)
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = sorted(op.label for op in operations)
    assert set(GENERATION_OPS) <= set(labels), labels
    seen: dict[str, set[int]] = {}
    t0 = time.monotonic()
    for op in operations:
        for mode, stream in VARIANTS:
            if op.label not in GENERATION_OPS and (stream or mode is GenerationMode.NEGATIVE):
                continue                      # nothing to break or stream in a GET without parameters
            run_examples(server, op, mode, stream, seen)
    elapsed = time.monotonic() - t0
    # the fuzzing reached the engine: some generated requests were valid and answered
    for label in GENERATION_OPS:
        assert {200, 400, "streamed"} <= seen[label], (label, seen[label])
    server.wait_idle()
    assert SCALE or elapsed < 60, elapsed


def run_examples(server, op, mode: GenerationMode, stream: bool, seen: dict[str, set[int]]) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}

    @settings(max_examples=EXAMPLES[mode] if op.label in GENERATION_OPS else 3, deadline=None, database=None,
              derandomize=not SCALE, phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case):
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
            if "model" in case.body:
                case.body["model"] = "tiny"           # else nearly every valid request is a 404 (unknown model)
            if stream:
                case.body.update(stream=True, stream_options={"include_usage": True})
        response = case.call(base_url=server.url, headers=headers, timeout=30)
        seen.setdefault(op.label, set()).add(response.status_code)
        if stream and response.status_code == 200:
            assert response.headers["content-type"][0].startswith("text/event-stream")
            assert response.text.endswith("data: [DONE]\n\n")
            seen[op.label].add("streamed")
        case.validate_response(response, checks=CHECKS)

    run()
