"""Fixtures for the drafter tests; helpers live in drafter_helpers.py."""

import pytest

from drafter_helpers import make_target


@pytest.fixture
def target():
    """A tiny Qwen3 target (6 layers, hidden 32, vocab 96), float64, scrambled weights."""
    return make_target()
