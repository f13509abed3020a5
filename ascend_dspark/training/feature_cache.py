"""Optional offline cache of the target's outputs, for repeated training runs on one dataset.

Training needs, per sample, the target's `features` [T, m*H] (its hidden states at the
drafter's target layers, concatenated; `ForwardOutput.features`) and `last_hidden` [T, H]
(the final-normed hidden state whose LM-head logits are the target's distribution;
`ForwardOutput.hidden`). Online, the trainer computes them every step with
`compute_target_outputs`; for many runs (or epochs) over the same data it is cheaper to
compute them once and read them back. DeepSpec does the same ("target cache") and ships
only the pre-LM-head hidden state, not logits: O(H) per token instead of O(V).

Layout of a cache directory:

    manifest.json            target identity (config + weight probe fingerprints, layer ids,
                             dtype) and, per shard: file, sha256, sample ids, lengths, shapes
    shard-00000.safetensors  input_ids [N], offsets [n+1], features [N, m*H], last_hidden [N, H]
                             (the shard's samples packed end to end, N = sum of lengths)

Writing is resumable: shard k always holds samples [k*S, (k+1)*S) of the given list, and a
shard already on disk whose checksum matches the manifest is skipped. Each shard and the
manifest are written to a temporary file and renamed, so a killed writer leaves no
half-written file behind. Reading verifies the checksum; a corrupt shard, or a cache made
for another target or other layer ids, is a ValueError naming the file and what differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .batch import target_outputs
from .dataset import Sample, collate

MANIFEST = "manifest.json"
FORMAT = "ascend-dspark-feature-cache"
VERSION = 1

# One function for both paths (the trainer's online features and the cache writer), so a
# cached run trains on exactly what an online run computes:
#   compute_target_outputs(target, input_ids [B, T], lengths [B], layer_ids) -> (features, last_hidden)
compute_target_outputs = target_outputs


@dataclass
class CachedSample:
    id: str
    input_ids: torch.Tensor      # [T] long
    features: torch.Tensor       # [T, m*H]
    last_hidden: torch.Tensor    # [T, H]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def target_identity(target, layer_ids, dtype: torch.dtype) -> dict:
    """What a cache is valid for: architecture, weights (a probe), layer ids and stored dtype.

    The weight probe hashes slices of a few tensors rounded to bf16, so the same checkpoint
    loaded in bf16 or fp32 matches, while a fine-tuned or other checkpoint does not."""
    cfg = {k: v for k, v in dataclasses.asdict(target.config).items() if k != "raw"}
    config_sha = _sha256_bytes(json.dumps(cfg, sort_keys=True, default=str).encode())
    last = target.config.num_layers - 1
    qkv = target.model.layers[0].self_attn.qkv_proj
    probe = {"model.embed_tokens.weight": target.model.embed_tokens.weight, "lm_head.weight": target.lm_head.weight,
             "model.norm.weight": target.model.norm.weight,
             "model.layers.0.self_attn.q_proj.weight": qkv.weight[:qkv.parts["q_proj"]],
             f"model.layers.{last}.mlp.down_proj.weight": target.model.layers[last].mlp.down_proj.weight}
    h = hashlib.sha256()
    for name, weight in probe.items():
        t = weight.detach().reshape(-1)[:4096].to("cpu", torch.bfloat16)
        h.update(name.encode())
        h.update(t.view(torch.int16).numpy().tobytes())
    return {"model_type": target.config.model_type, "hidden_size": target.config.hidden_size,
            "num_layers": target.config.num_layers, "config_sha256": config_sha, "weights_sha256": h.hexdigest(),
            "layer_ids": [int(i) for i in layer_ids], "dtype": _dtype_name(dtype)}


def _mismatches(found: dict, expected: dict) -> list[str]:
    names = {"config_sha256": "target config", "weights_sha256": "target weights", "layer_ids": "layer ids",
             "dtype": "dtype", "model_type": "model type", "hidden_size": "hidden size", "num_layers": "layers"}
    return [f"{names.get(k, k)}: cache has {found.get(k)}, expected {expected[k]}"
            for k in expected if found.get(k) != expected[k]]


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def write_feature_cache(target, samples: list[Sample], out_dir: str | Path, layer_ids, *,
                        samples_per_shard: int = 256, batch_size: int = 8, dtype: torch.dtype | None = None,
                        progress: bool = True) -> list[int]:
    """Compute and store the target outputs of `samples`; returns the shard indices written.

    Shards already present and verified are skipped. `dtype` (default: the target's) is the
    stored precision; bf16 halves the size of an fp32 target's cache. Within a shard,
    samples run in batches of `batch_size`, longest first, to keep padding low.
    """
    from safetensors.torch import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or next(target.parameters()).dtype
    identity = target_identity(target, layer_ids, dtype)
    plan = [samples[i: i + samples_per_shard] for i in range(0, len(samples), samples_per_shard)]
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        bad = _mismatches(manifest.get("target", {}), identity)
        if bad:
            raise ValueError(f"{manifest_path}: this cache was made for another target or layers ("
                             + "; ".join(bad) + "): use another directory")
    else:
        manifest = {"format": FORMAT, "version": VERSION, "target": identity, "shards": []}
    manifest["num_samples"], manifest["samples_per_shard"] = len(samples), samples_per_shard
    shards = (manifest["shards"] + [None] * len(plan))[: len(plan)]
    for k, chunk in enumerate(plan):
        ids = [s.id for s in chunk]
        if shards[k] is not None and shards[k]["sample_ids"] != ids:
            raise ValueError(f"{out / shards[k]['file']}: holds other samples than shard {k} of this dataset "
                             f"(first id {shards[k]['sample_ids'][0]!r}, expected {ids[0]!r}): use another directory")
    manifest["shards"] = shards

    written = []
    device = next(target.parameters()).device
    bar = tqdm(total=len(plan), desc="feature cache", unit="shard", disable=not progress)
    for k, chunk in enumerate(plan):
        entry = shards[k]
        if entry is not None and _verified(out / entry["file"], entry["sha256"]):
            bar.update(1)
            continue
        rows: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(chunk)
        order = sorted(range(len(chunk)), key=lambda i: -len(chunk[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            input_ids, _, lengths = collate([chunk[i] for i in idx])
            feats, hidden = compute_target_outputs(target, input_ids.to(device), lengths.to(device), layer_ids)
            for b, i in enumerate(idx):
                n = int(lengths[b])
                rows[i] = (feats[b, :n].to("cpu", dtype), hidden[b, :n].to("cpu", dtype))
        lengths = [len(s) for s in chunk]
        tensors = {
            "input_ids": torch.cat([s.input_ids for s in chunk]).contiguous(),
            "offsets": torch.tensor([0] + lengths).cumsum(0),
            "features": torch.cat([r[0] for r in rows]).contiguous(),
            "last_hidden": torch.cat([r[1] for r in rows]).contiguous(),
        }
        data = save(tensors)
        name = _shard_name(k)
        tmp = out / (name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, out / name)
        shards[k] = {"file": name, "sha256": _sha256_bytes(data), "sample_ids": [s.id for s in chunk],
                     "lengths": lengths, "shapes": {n: list(t.shape) for n, t in tensors.items()}}
        _write_json_atomic(manifest_path, manifest)
        written.append(k)
        bar.update(1)
    bar.close()
    _write_json_atomic(manifest_path, manifest)
    return written


def _verified(path: Path, sha256: str) -> bool:
    return path.is_file() and _sha256_bytes(path.read_bytes()) == sha256


class FeatureCache:
    """Read a cache directory; pass `target` and `layer_ids` to check it was made for them."""

    def __init__(self, path: str | Path, target=None, layer_ids=None, dtype: torch.dtype | None = None) -> None:
        self.dir = Path(path)
        self.manifest_path = self.dir / MANIFEST
        if not self.manifest_path.is_file():
            raise FileNotFoundError(f"{self.manifest_path} not found: not a feature cache (write_feature_cache makes one)")
        self.manifest = json.loads(self.manifest_path.read_text())
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise ValueError(f"{self.manifest_path}: not a version-{VERSION} {FORMAT} manifest")
        self.identity = self.manifest["target"]
        if target is not None or layer_ids is not None:
            self.check(target, layer_ids, dtype)
        self.shards = self.manifest["shards"]
        self._index = {sid: (k, row) for k, sh in enumerate(self.shards) if sh
                       for row, sid in enumerate(sh["sample_ids"])}

    def check(self, target=None, layer_ids=None, dtype: torch.dtype | None = None) -> None:
        """ValueError naming the manifest and every difference from what the caller trains with."""
        expected: dict = {}
        if target is not None:           # unspecified layer ids / dtype: the cache's own
            expected = target_identity(target, self.identity["layer_ids"] if layer_ids is None else layer_ids,
                                       dtype or getattr(torch, self.identity["dtype"]))
        if layer_ids is not None:
            expected["layer_ids"] = [int(i) for i in layer_ids]
        if dtype is not None:
            expected["dtype"] = _dtype_name(dtype)
        bad = _mismatches(self.identity, expected)
        if bad:
            raise ValueError(f"{self.manifest_path}: cache was made for another target or layers: " + "; ".join(bad))

    def __len__(self) -> int:
        return len(self.shards)

    @property
    def complete(self) -> bool:
        return all(sh is not None for sh in self.shards)

    def locate(self, sample_id: str) -> tuple[int, int]:
        """(shard index, row in the shard) of a cached sample."""
        if sample_id not in self._index:
            raise KeyError(f"sample {sample_id!r} is not in the feature cache {self.dir}")
        return self._index[sample_id]

    def read(self, shard_index: int) -> list[CachedSample]:
        """The samples of one shard, after checking the file against the manifest's sha256."""
        from safetensors.torch import load

        entry = self.shards[shard_index]
        if entry is None:
            raise ValueError(f"{self.dir / _shard_name(shard_index)}: shard {shard_index} was never written "
                             "(an interrupted write_feature_cache: run it again to finish the cache)")
        path = self.dir / entry["file"]
        if not path.is_file():
            raise ValueError(f"{path}: missing (listed in {self.manifest_path}); rerun write_feature_cache")
        data = path.read_bytes()
        digest = _sha256_bytes(data)
        if digest != entry["sha256"]:
            raise ValueError(f"{path}: corrupt shard, sha256 {digest} != {entry['sha256']} in the manifest; "
                             "delete it and rerun write_feature_cache")
        t = load(data)
        shapes = {n: list(v.shape) for n, v in t.items()}
        if shapes != entry["shapes"]:
            raise ValueError(f"{path}: tensor shapes {shapes} differ from the manifest's {entry['shapes']}")
        off = t["offsets"].tolist()
        return [CachedSample(sid, t["input_ids"][a:b], t["features"][a:b], t["last_hidden"][a:b])
                for sid, a, b in zip(entry["sample_ids"], off[:-1], off[1:])]
