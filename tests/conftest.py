"""Suite-wide switches and fixtures.

CUDA tests skip without a GPU unless ASCEND_DSPARK_REQUIRE_CUDA=1. The real default model
is loaded once per session; its GGUF -> safetensors conversion goes into a fresh temporary
cache unless ASCEND_DSPARK_CACHE names one to share between runs.
"""

from __future__ import annotations

import os

import pytest
import torch

from ascend_dspark.models import load_target
from ascend_dspark.models.gguf import CACHE_ENV


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    if os.environ.get("ASCEND_DSPARK_REQUIRE_CUDA") == "1":
        raise pytest.UsageError("ASCEND_DSPARK_REQUIRE_CUDA=1 but torch.cuda.is_available() is False")
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (make test-cuda on the H200)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """ASCEND_DSPARK_CACHE for the tests that touch the default model."""
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get(CACHE_ENV):
            mp.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("ascend-dspark-cache")))
        yield os.environ[CACHE_ENV]


@pytest.fixture(scope="session")
def smollm2(smollm2_cache):
    """(DecoderModel, Tokenizer) of SmolLM2-135M-Instruct in float32 on the CPU."""
    return load_target("default", torch.float32, torch.device("cpu"))


@pytest.fixture(scope="session")
def smollm2_hf():
    """transformers' own model, read from the same GGUF file."""
    from transformers import AutoModelForCausalLM

    from ascend_dspark.models.loader import default_gguf

    path = default_gguf()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()
