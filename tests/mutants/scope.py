"""pytest plugin for `make mutants` (loaded with `-p tests.mutants.scope` in the staged copy).

Mutants of verification and sampling (`ascend_dspark.spec.*`, `ops.*`) run against the unit
tests of verification and sampling only (tests/spec, tests/ops): those must pin the rules
on their own, and the engine tests reach them seven calls deep and take a minute per
surviving mutant. Mutants of the engine and the drafters run against the whole fast
selection. mutmut sets MUTANT_UNDER_TEST in the worker that tests a mutant ("stats",
"fail" or "" in its other runs, which are left alone).
"""

from __future__ import annotations

import os

UNIT_SCOPED = ("ops.", "ascend_dspark.spec.")
UNIT_TESTS = ("tests/spec/", "tests/ops/")


def pytest_collection_modifyitems(config, items):
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if not mutant.startswith(UNIT_SCOPED):
        return
    kept = [item for item in items if item.nodeid.startswith(UNIT_TESTS)]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept
