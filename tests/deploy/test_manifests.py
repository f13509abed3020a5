"""The Kubernetes manifests of deploy/k8s: yamllint, kubernetes-validate --strict against
Kubernetes' own schemas (two versions), the LeaderWorkerSets against the lws CRD's schema
(tests/deploy/schemas/), each validator shown to reject a planted typo; then what the
manifests must say for the server to run: the accelerator resource, probes on /health at
the image's port, scrape annotations, the queue metric the server really exports, the
torchrun / HCCL settings of a multi-node group."""

from __future__ import annotations

import json
from pathlib import Path

import jsonpatch
import jsonschema
import pytest
import yaml

from tests.deploy.images import REPO, parse
from tests.deploy.tools import run

K8S = REPO / "deploy" / "k8s"
LWS_SCHEMA = Path(__file__).parent / "schemas" / "leaderworkerset-v1.json"
# The oldest Kubernetes still maintained when this was written, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.32.0", "1.37.0")
IMAGE_PORT = int(parse("cpu").env["ASCEND_DSPARK_SERVE_PORT"])


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and p.parent.name != "autoscaling")
BY_KIND = {}
for _path in MANIFESTS:
    for _doc in documents(_path):
        BY_KIND.setdefault(_doc["kind"], []).append((_path, _doc))


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def build(directory: Path) -> list[tuple[Path, dict]]:
    """What `kubectl apply -k directory` would apply, for the two things these
    kustomizations use: `resources` (files, or directories built the same way) and inline
    JSON 6902 `patches` on a target kind and name (applied with the jsonpatch library)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs = []
    for resource in kustomization["resources"]:
        path = (directory / resource).resolve()
        docs += build(path) if path.is_dir() else [(path, d) for d in documents(path)]
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        hits = [i for i, (_, d) in enumerate(docs)
                if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        assert len(hits) == 1, (rel(directory), target)
        path, doc = docs[hits[0]]
        docs[hits[0]] = (directory / "kustomization.yaml", jsonpatch.apply_patch(doc, yaml.safe_load(patch["patch"])))
    return docs


OVERLAYS = sorted(k.parent for k in K8S.rglob("kustomization.yaml")
                  if any(r.startswith("..") for r in yaml.safe_load(k.read_text())["resources"]))
OVERLAY_SERVERS = [(p, d) for o in OVERLAYS for p, d in build(o) if p.name == "kustomization.yaml"]


def test_yamllint_finds_nothing():
    proc = run("yamllint", "--strict", "deploy", ".yamllint", ".hadolint.yaml", cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_yamllint_fails_a_planted_mistake(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((K8S / "ascend" / "service.yaml").read_text().replace("  type: ClusterIP", "  type: ClusterIP\n  type: ClusterIP"))
    proc = run("yamllint", "--strict", "-c", str(REPO / ".yamllint"), str(bad))
    assert proc.returncode != 0 and "key-duplicates" in proc.stdout, proc.stdout


def _pod_templates(tmp_path: Path) -> list[Path]:
    """Each LeaderWorkerSet's two pod templates as core/v1 PodTemplates, for Kubernetes' schema."""
    out = []
    for path, lws in BY_KIND["LeaderWorkerSet"]:
        for role in ("leaderTemplate", "workerTemplate"):
            target = tmp_path / f"{path.parent.name}-{role}.yaml"
            target.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "PodTemplate",
                                              "metadata": {"name": f"{lws['metadata']['name']}-{role.lower()}"},
                                              "template": lws["spec"]["leaderWorkerTemplate"][role]}))
            out.append(target)
    return out


def _overlay_results(tmp_path: Path) -> list[Path]:
    """The objects the overlays patch, as built, one file each."""
    out = []
    for path, doc in OVERLAY_SERVERS:
        target = tmp_path / f"{path.parent.name}-{doc['kind']}.yaml"
        target.write_text(yaml.safe_dump(doc))
        out.append(target)
    return out


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_validate_strict_passes_every_manifest(version, tmp_path):
    core = [p for p in MANIFESTS if all(d["kind"] != "LeaderWorkerSet" for d in documents(p))]
    files = [str(p) for p in core + _pod_templates(tmp_path) + _overlay_results(tmp_path)]
    proc = run("kubernetes-validate", "--strict", "--kubernetes-version", version, *files)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "WARN" not in out, out          # WARN: a kind it has no schema for
    assert out.count("passed for resource") == len(files), out


def test_kubernetes_validate_strict_fails_a_planted_typo(tmp_path):
    bad = tmp_path / "deployment.yaml"
    bad.write_text((K8S / "ascend" / "deployment.yaml").read_text().replace("livenessProbe:", "livenesProbe:"))
    proc = run("kubernetes-validate", "--strict", "--kubernetes-version", K8S_VERSIONS[-1], str(bad))
    assert proc.returncode != 0 and "livenesProbe" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_leaderworkersets_match_the_lws_schema():
    validator = jsonschema.Draft7Validator(json.loads(LWS_SCHEMA.read_text()))
    assert len(BY_KIND["LeaderWorkerSet"]) == 2
    for path, lws in BY_KIND["LeaderWorkerSet"]:
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(lws)]
        assert not errors, (rel(path), errors)
    typo = json.loads(json.dumps(lws))
    typo["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "RecreateGroupOnPodRestar"
    typo["spec"]["startupPolicies"] = "LeaderCreated"
    assert len(list(validator.iter_errors(typo))) == 2


def test_each_kustomization_lists_its_directory():
    for kustomization in K8S.rglob("kustomization.yaml"):
        listed = yaml.safe_load(kustomization.read_text())
        if kustomization.parent in OVERLAYS:           # a base and patches: each patch hits one object
            assert len(build(kustomization.parent)) == len(build((kustomization.parent / listed["resources"][0]).resolve()))
            continue
        here = sorted(p.name for p in kustomization.parent.glob("*.yaml") if p.name != "kustomization.yaml")
        assert sorted(listed["resources"]) == here, rel(kustomization)
        images = {c["image"].split(":")[0] for p in here for d in documents(kustomization.parent / p)
                  for c in _containers(d)}
        assert images == {i["name"] for i in listed["images"]}, rel(kustomization)


def _pod_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "Deployment":
        return [doc["spec"]["template"]]
    if doc["kind"] == "LeaderWorkerSet":
        t = doc["spec"]["leaderWorkerTemplate"]
        return [t["leaderTemplate"], t["workerTemplate"]]
    return []


def _containers(doc: dict) -> list[dict]:
    return [c for t in _pod_specs(doc) for c in t["spec"]["containers"]]


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _accelerator(path: Path) -> str:
    return "huawei.com/Ascend910" if path.parent.name.startswith("ascend") else "nvidia.com/gpu"


def test_servers_request_their_accelerator_and_probe_health_on_the_image_port():
    servers = BY_KIND["Deployment"] + BY_KIND["LeaderWorkerSet"] + OVERLAY_SERVERS
    assert {p.parent.name for p, _ in servers} == {"ascend", "cuda", "ascend-multinode", "cuda-multinode",
                                                   "ascend-tp8", "cuda-tp8"}
    for path, doc in servers:
        for template in _pod_specs(doc):
            (container,) = template["spec"]["containers"]
            limits = container["resources"]["limits"]
            cards = limits[_accelerator(path)]
            assert set(limits) == {_accelerator(path), "memory"}, rel(path)
            assert container["image"].endswith(":ascend" if "ascend" in path.parent.name else ":cuda")
            env = _env(container)
            if _accelerator(path) == "huawei.com/Ascend910":
                # the cards granted, as the pod numbers them
                assert env["ASCEND_RT_VISIBLE_DEVICES"] == ",".join(map(str, range(cards))), rel(path)
                assert template["spec"]["nodeSelector"] == {"accelerator": "huawei-Ascend910"}
                assert {m["mountPath"] for m in container["volumeMounts"]} >= {
                    "/usr/local/Ascend/driver", "/usr/local/dcmi", "/usr/local/bin/npu-smi", "/etc/ascend_install.info"}
            security = template["spec"]["securityContext"]
            assert security["runAsNonRoot"] and security["runAsUser"] == 1000
            is_worker = template is _pod_specs(doc)[-1] and doc["kind"] == "LeaderWorkerSet"
            if is_worker:                  # workers serve no HTTP: nothing to probe
                assert not {"startupProbe", "readinessProbe", "livenessProbe"} & set(container)
                continue
            port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
            assert port == IMAGE_PORT
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, (rel(path), probe)
            annotations = template["metadata"]["annotations"]
            assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                                   "prometheus.io/path": "/metrics"}, rel(path)


def test_services_select_the_pods_that_serve():
    for path, service in BY_KIND["Service"]:
        (target,) = [d for p, d in BY_KIND["Deployment"] + BY_KIND["LeaderWorkerSet"] if p.parent == path.parent]
        serving = _pod_specs(target)[0]
        labels = dict(serving["metadata"]["labels"])
        if target["kind"] == "LeaderWorkerSet":      # the controller labels every pod with its set
            labels["leaderworkerset.sigs.k8s.io/name"] = target["metadata"]["name"]
        assert service["spec"]["selector"].items() <= labels.items(), rel(path)
        assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_autoscalers_scale_on_the_queue_depth_the_server_exports():
    from serving.metrics import Metrics

    exported = Metrics("default").render().decode()
    adapter = yaml.safe_load((K8S / "autoscaling" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    series = rule["seriesQuery"].split("{")[0]
    assert f"\n{series}{{" in exported and f"# TYPE {series} gauge" in exported   # a real gauge of /metrics
    renamed = rule["name"]["as"]
    assert len(BY_KIND["HorizontalPodAutoscaler"]) == 4
    for path, hpa in BY_KIND["HorizontalPodAutoscaler"]:
        (target,) = [d for p, d in BY_KIND["Deployment"] + BY_KIND["LeaderWorkerSet"] if p.parent == path.parent]
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"], ref["name"]) == (target["apiVersion"], target["kind"],
                                                                 target["metadata"]["name"]), rel(path)
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == renamed, rel(path)


def test_tensor_parallel_in_a_node_spans_the_pod_s_cards():
    assert {p.parent.name for p, _ in OVERLAY_SERVERS} == {"ascend-tp8", "cuda-tp8"}
    for path, deployment in OVERLAY_SERVERS:
        (container,) = _containers(deployment)
        cards = container["resources"]["limits"][_accelerator(path)]
        args = container["args"]
        assert cards == 8 and args[:2] == ["ascend-dspark", "serve"], rel(path)
        assert int(args[args.index("--tensor-parallel-size") + 1]) == cards


def test_multinode_groups_run_one_torchrun_per_pod_over_the_whole_group():
    for path, lws in BY_KIND["LeaderWorkerSet"]:
        template = lws["spec"]["leaderWorkerTemplate"]
        leader, worker = (t["spec"]["containers"][0] for t in (template["leaderTemplate"], template["workerTemplate"]))
        assert leader["args"] == worker["args"] and _env(leader) == _env(worker), rel(path)
        args = leader["args"]
        flags = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
        assert args[0] == "torchrun" and args[args.index("-m") + 1:args.index("-m") + 3] == ["serving.cli", "serve"]
        assert flags["--nnodes"] == "$(LWS_GROUP_SIZE)" and flags["--node-rank"] == "$(LWS_WORKER_INDEX)"
        cards = leader["resources"]["limits"][_accelerator(path)]
        assert int(flags["--nproc-per-node"]) == cards
        assert int(flags["--tensor-parallel-size"]) == cards * template["size"]
        env = _env(leader)
        assert env["MASTER_ADDR"] == "$(LWS_LEADER_ADDRESS)" and flags["--master-addr"] == "$(MASTER_ADDR)"
        assert flags["--master-port"] == "$(MASTER_PORT)"
        assert {"containerPort": int(env["MASTER_PORT"]), "name": "rendezvous"} in leader["ports"]
        assert lws["spec"]["startupPolicy"] == "LeaderCreated"            # LeaderReady deadlocks
        assert template["restartPolicy"] == "RecreateGroupOnPodRestart"   # one dead rank ends the group
        if _accelerator(path) == "huawei.com/Ascend910":
            assert env["HCCL_IF_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
            assert env["HCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "eth0"
            assert 120 <= int(env["HCCL_CONNECT_TIMEOUT"]) <= 7200          # HCCL's accepted range
        else:
            assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "eth0"
