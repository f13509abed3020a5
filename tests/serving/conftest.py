"""Fixtures of the serving tests: a tiny random model directory (with a character tokenizer
and a chat template, tests/helpers.py) that the server and the offline engine both load."""

from __future__ import annotations

import pytest

from tests.helpers import tiny_hf_checkpoint


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return tiny_hf_checkpoint("llama", tmp_path_factory.mktemp("serving-model"))
