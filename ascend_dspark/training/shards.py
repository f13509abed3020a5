"""Regenerated training data stored compactly: uint16 token ids in compressed numpy shards.

A regeneration JSONL (`regen.py`) holds each token id as decimal text plus the prompt and
response text: ~6 bytes a token. A shard holds the ids as uint16 (every vocabulary here is
under 65,536; a larger id is refused, never wrapped) in a deflate-compressed `.npz` (zip's
gzip algorithm, read with numpy alone), about 1.5 bytes a token, and each shard stays under
`max_bytes` (default 15 MiB: what one file may weigh coming back from the GPU machine).

    data-00000.npz   tokens      uint16 [N]     prompt + response ids of every record, concatenated
                     offsets     int64  [n + 1] record i is tokens[offsets[i]:offsets[i + 1]]
                     prompt_lens int32  [n]     the first prompt_lens[i] ids are the prompt
                     ids, prompt_ids, sources, finish_reasons   str [n]
                     prompt_keys str [n]        sha256 of the normalised prompt text (first 16 hex):
                                                checks disjointness from eval prompts without the text
                     seeds       uint64 [n]

`write_shards` appends: it continues after the shards already in the directory and skips
record ids they hold, so packing a growing regeneration file again adds only what is new.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .prompts import normalize

logger = logging.getLogger(__name__)

SHARD_GLOB = "data-*.npz"
MAX_SHARD_BYTES = 15 * 2**20
MAX_TOKEN_ID = np.iinfo(np.uint16).max


def prompt_key(text: str) -> str:
    """The comparison key of a prompt's text (case/whitespace-insensitive), hashed."""
    return hashlib.sha256(normalize(text).encode()).hexdigest()[:16]


def base_prompt_id(record: dict) -> str:
    """The prompt a record answers: `prompt_id` where regen wrote one (several samples per
    prompt), else the record's own id."""
    return record.get("prompt_id") or record["id"]


def shard_paths(directory: str | Path) -> list[Path]:
    return sorted(Path(directory).glob(SHARD_GLOB))


def _encode(records: list[dict]) -> bytes:
    lens = [len(r["prompt_ids"]) + len(r["response_ids"]) for r in records]
    offsets = np.zeros(len(records) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    tokens = np.empty(int(offsets[-1]), dtype=np.uint16)
    for r, start, end in zip(records, offsets[:-1], offsets[1:]):
        ids = np.asarray(r["prompt_ids"] + r["response_ids"], dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() > MAX_TOKEN_ID):
            raise ValueError(f"record {r['id']!r}: token id {int(ids.max() if ids.max() > MAX_TOKEN_ID else ids.min())} "
                             f"does not fit uint16 (0..{MAX_TOKEN_ID})")
        tokens[start:end] = ids
    arrays = {
        "tokens": tokens, "offsets": offsets,
        "prompt_lens": np.asarray([len(r["prompt_ids"]) for r in records], dtype=np.int32),
        "ids": np.asarray([r["id"] for r in records], dtype=str),
        "prompt_ids": np.asarray([base_prompt_id(r) for r in records], dtype=str),
        "sources": np.asarray([r.get("source", "") for r in records], dtype=str),
        "finish_reasons": np.asarray([r.get("finish_reason") or "" for r in records], dtype=str),
        "prompt_keys": np.asarray([r.get("prompt_key") or (prompt_key(r["prompt"]) if "prompt" in r else "")
                                   for r in records], dtype=str),
        "seeds": np.asarray([int(r.get("seed") or 0) for r in records], dtype=np.uint64),
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def write_shards(records: Iterable[dict], directory: str | Path, max_bytes: int = MAX_SHARD_BYTES,
                 records_per_try: int = 4096) -> list[Path]:
    """Append `records` (regen records) to the shards in `directory`; returns the new files.

    Records whose id a shard already holds are skipped. A shard is filled with up to
    `records_per_try` records and halved until its compressed size is under `max_bytes`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    existing = shard_paths(directory)
    have = {i for p in existing for i in _read(p)["ids"].tolist()}
    todo = [r for r in records if r["id"] not in have and not have.add(r["id"])]
    written: list[Path] = []
    index = len(existing)
    while todo:
        n = min(records_per_try, len(todo))
        while True:
            blob = _encode(todo[:n])
            if len(blob) < max_bytes:
                break
            if n == 1:
                raise ValueError(f"record {todo[0]['id']!r} alone compresses to {len(blob)} bytes > {max_bytes}")
            n //= 2
        path = directory / f"data-{index:05d}.npz"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(path)
        written.append(path)
        index += 1
        todo = todo[n:]
    return written


def _read(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def read_shard(path: str | Path) -> dict[str, np.ndarray]:
    """One shard's arrays (see the module docstring)."""
    return _read(Path(path))


def iter_shard_records(paths: str | Path | Iterable[str | Path]) -> Iterator[dict]:
    """Records of shard files or directories of shards, as regen-style dicts (token ids as
    lists; `prompt` text is not stored, `prompt_key` stands for it)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: list[Path] = []
    for p in map(Path, paths):
        files += shard_paths(p) if p.is_dir() else [p]
    for path in files:
        z = _read(path)
        tokens, offsets, plens = z["tokens"], z["offsets"], z["prompt_lens"]
        for i in range(len(plens)):
            ids = tokens[offsets[i]:offsets[i + 1]].astype(np.int64).tolist()
            yield {"id": str(z["ids"][i]), "prompt_id": str(z["prompt_ids"][i]), "source": str(z["sources"][i]),
                   "seed": int(z["seeds"][i]), "prompt_key": str(z["prompt_keys"][i]),
                   "finish_reason": str(z["finish_reasons"][i]) or None,
                   "prompt_ids": ids[: plens[i]], "response_ids": ids[plens[i]:]}


def pack(jsonl_paths: Iterable[str | Path], directory: str | Path, max_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Append the records of regeneration JSONL files to the shards in `directory`."""
    from .regen import read_records

    records = [r for p in jsonl_paths for r in read_records(p)]
    new = write_shards(records, directory, max_bytes)
    files = shard_paths(directory)
    summary = {"records": sum(len(_read(p)["prompt_lens"]) for p in files), "new_files": [p.name for p in new],
               "files": len(files), "bytes": sum(p.stat().st_size for p in files),
               "largest_file_bytes": max((p.stat().st_size for p in files), default=0)}
    logger.info("packed %s", json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m ascend_dspark.training.shards OUT_DIR regen.jsonl [...]`: pack JSONL into shards."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m ascend_dspark.training.shards")
    p.add_argument("out", help="shard directory (appended to)")
    p.add_argument("jsonl", nargs="+", help="regeneration JSONL files")
    p.add_argument("--max-mib", type=float, default=MAX_SHARD_BYTES / 2**20)
    args = p.parse_args(argv)
    print(json.dumps(pack(args.jsonl, args.out, int(args.max_mib * 2**20))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
