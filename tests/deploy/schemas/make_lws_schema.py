"""Writes leaderworkerset-v1.json: the LeaderWorkerSet schema the manifest tests check against.

kubernetes-validate ships the schemas of Kubernetes' own kinds only (a LeaderWorkerSet just
gets a warning), so the LeaderWorkerSet's fields are checked against the CRD's own
openAPIV3Schema, taken from the lws release's
config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml and changed twice:
- every object with listed properties gets `additionalProperties: false`, as the API server's
  structural pruning would drop an unknown field (a typo must fail, not vanish);
- the two pod templates become plain objects: the tests check each as a core/v1 PodTemplate
  with kubernetes-validate --strict, against Kubernetes' schema of that version.

    python tests/deploy/schemas/make_lws_schema.py CRD.yaml v0.10.0 > tests/deploy/schemas/leaderworkerset-v1.json
"""

from __future__ import annotations

import json
import sys

import yaml

POD_TEMPLATES = ("leaderTemplate", "workerTemplate")


def strict(schema: dict) -> dict:
    """The schema with unknown properties refused wherever properties are listed."""
    out = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: ({"type": "object"} if name in POD_TEMPLATES else strict(sub))
                        for name, sub in value.items()}
        elif key == "items" and isinstance(value, dict):
            out[key] = strict(value)
        else:
            out[key] = value
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def main(crd_path: str, release: str) -> int:
    with open(crd_path) as f:
        crd = yaml.safe_load(f)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = version["schema"]["openAPIV3Schema"]
    schema = {**schema, "properties": {**schema["properties"],
                                       "apiVersion": {"const": "leaderworkerset.x-k8s.io/v1"},
                                       "kind": {"const": "LeaderWorkerSet"}}}
    schema["properties"].pop("status", None)          # written by the controller, never by us
    out = strict(schema)
    out["properties"]["metadata"] = {"type": "object"}   # checked by the API server's ObjectMeta
    out["required"] = ["apiVersion", "kind", "metadata", "spec"]
    out["$comment"] = (f"kubernetes-sigs/lws {release} config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml, "
                       "made strict by tests/deploy/schemas/make_lws_schema.py")
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
