"""Fixtures of the serving tests: a tiny random model directory (with a character tokenizer
and a chat template, tests/helpers.py) that the server and the offline engine both load."""

from __future__ import annotations

import pytest

from tests.helpers import tiny_hf_checkpoint


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return tiny_hf_checkpoint("llama", tmp_path_factory.mktemp("serving-model"))


@pytest.fixture(scope="session")
def default_server(smollm2_cache, tmp_path_factory):
    """One real server of the default model (SmolLM2-135M-Instruct with its shipped DSpark
    draft drafting K every step) under two served names, shared by the modules that check
    what evaluation harnesses need of it (tokenizer routes, echo + logprobs, lm-eval)."""
    from tests.serving.server_process import running_server, server_env

    env = server_env("default", threads=1, max_model_len=DEFAULT_MAX_MODEL_LEN, max_num_seqs=4,
                     served_model_name="smol,smollm2-alias", speculation="fixed")
    with running_server(env, tmp_path_factory.mktemp("default-server") / "server.log") as srv:
        yield srv
    log = srv.log()
    assert "Traceback" not in log, log[-4000:]


@pytest.fixture(scope="session")
def hf_tokenizer(smollm2_cache):
    """The default model's tokenizer as transformers reads it from the GGUF file, apart from
    the server's loader: the oracle of the tokenizer routes."""
    from transformers import AutoTokenizer

    from ascend_dspark.models.loader import default_gguf

    path = default_gguf()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


DEFAULT_MAX_MODEL_LEN = 1024
