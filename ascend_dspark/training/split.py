"""The validation split: a fixed ~2% of the training *prompts*, never trained on.

A prompt is held out when a hash of (split seed, prompt id) falls below the fraction, so
the split depends on nothing but the prompt's id: it is the same in every run and on
every machine, it does not move when the data grows (a prompt regenerated on the next GPU
run lands on the same side), and every sample of a prompt (`<prompt id>#<k>`) lands on the
same side as its siblings, so the draft never saw another sample of a validation prompt.

Evaluation prompts (GSM8K test, HumanEval, MT-Bench) are never training prompts
(`prompts.training_mix` asserts it); `assert_disjoint_from_eval` checks the samples
again, by the hash of their normalised prompt text, wherever the eval sets can be read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from .dataset import Sample

DEFAULT_FRACTION = 0.02


def validation_score(prompt_id: str, seed: int = 0) -> float:
    """A uniform number in [0, 1) fixed by (seed, prompt id)."""
    digest = hashlib.sha256(f"val:{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def is_validation(prompt_id: str, fraction: float = DEFAULT_FRACTION, seed: int = 0) -> bool:
    return validation_score(prompt_id, seed) < fraction


def split_samples(samples: Sequence[Sample], fraction: float = DEFAULT_FRACTION, seed: int = 0
                  ) -> tuple[list[Sample], list[Sample]]:
    """(train, validation), each in the given order; grouped by `Sample.prompt_id` (its id
    where none was recorded)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    train, val = [], []
    for s in samples:
        (val if fraction and is_validation(s.prompt_id or s.id, fraction, seed) else train).append(s)
    return train, val


def assert_disjoint_from_eval(samples: Iterable[Sample], eval_prompts: Iterable) -> None:
    """ValueError if any sample's prompt (by `prompt_key`) is an evaluation prompt."""
    from .shards import prompt_key

    keys = {prompt_key(p.text): p.id for p in eval_prompts}
    hits = [(s.id, keys[s.prompt_key]) for s in samples if s.prompt_key and s.prompt_key in keys]
    if hits:
        shown = ", ".join(f"{a} == {b}" for a, b in hits[:5])
        raise ValueError(f"{len(hits)} training/validation samples answer evaluation prompts: {shown}")
