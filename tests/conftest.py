"""Suite-wide switches: CUDA tests skip without a GPU unless ASCEND_DSPARK_REQUIRE_CUDA=1."""

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    if os.environ.get("ASCEND_DSPARK_REQUIRE_CUDA") == "1":
        raise pytest.UsageError("ASCEND_DSPARK_REQUIRE_CUDA=1 but torch.cuda.is_available() is False")
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (make test-cuda on the H200)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
