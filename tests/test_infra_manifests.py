"""infra/ validated offline: every Kubernetes manifest against its schema, strictly (KubeRay's
v1.7.0 CRDs, vendored in infra/k8s/schemas; built-in kinds against Kubernetes' own schemas from
the kubernetes-validate package), every overlay as `kubectl kustomize` builds it, serveConfigV2
against Ray Serve's schema and ServeConfig, every entrypoint through the r2ray CLI parser after
the shell that submits it has expanded it, one Ray version everywhere, and the generated files
against their sources."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from r2ray import deploy

K8S = REPO / "infra" / "k8s"
SCHEMAS = K8S / "schemas" / "kuberay-v1.7.0"
CRD_SCHEMAS = {"RayJob": "rayjob.json", "RayCronJob": "raycronjob.json",
               "RayService": "rayservice.json"}
KUBERNETES_VERSION = "1.30"  # the oldest we claim; CronJob.spec.timeZone is GA since 1.27
KUBERNETES_SCHEMAS = f"kubernetes-json-schema/v{KUBERNETES_VERSION}.0-local-strict"
OVERLAYS = ["cpu", "gpu", "cpu-cronjob", "gpu-cronjob"]
PLACEHOLDER = re.compile(r"CHANGE-ME|example\.internal")


def strict(schema):
    """A copy of an OpenAPI v3 schema from a CRD that rejects unknown fields: every object schema
    that lists ``properties`` gets ``additionalProperties: false``, unless it says
    ``x-kubernetes-preserve-unknown-fields`` or already says what extra keys may hold. The API
    server would prune an unknown field silently (a typo'd setting just vanishes); this check
    names it, as kubeconform's strict mode does."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    tightened = {key: strict(value) for key, value in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        tightened["additionalProperties"] = False
    return tightened


@functools.cache
def crd_validator(kind: str):
    import jsonschema

    return jsonschema.Draft7Validator(strict(json.loads((SCHEMAS / CRD_SCHEMAS[kind]).read_text())))


@functools.cache
def kubernetes_definitions() -> dict:
    from kubernetes_validate.utils import schema_contents

    return schema_contents(f"{KUBERNETES_SCHEMAS}/_definitions.json", KUBERNETES_VERSION)


@functools.cache
def builtin_validator(api_version: str, kind: str):
    """The strict schema kubernetes-validate ships for a built-in kind, as its ``validate`` finds
    it (``rbac.authorization.k8s.io/v1`` → ``rbac-v1``), compiled once: ``validate`` itself
    re-reads its 1.4 MB of definitions on every call."""
    import jsonschema
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema = schema_contents(f"{KUBERNETES_SCHEMAS}/{kind.lower()}-{group_version}.json",
                             KUBERNETES_VERSION)
    registry = Resource.from_contents(kubernetes_definitions()) @ Registry()
    return jsonschema.Draft202012Validator(schema, registry=registry)


@functools.cache
def object_meta_validator():
    """Kubernetes' ObjectMeta (strict): a CRD's schema says only ``metadata: {type: object}``."""
    import jsonschema
    from referencing import Registry, Resource

    definitions = kubernetes_definitions()
    meta = f"{definitions['$id']}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    registry = Resource.from_contents(definitions) @ Registry()
    return jsonschema.Draft202012Validator({"$ref": meta}, registry=registry)


def schema_errors(doc: dict) -> list[str]:
    """Every way ``doc`` breaks its kind's schema; [] when it is valid."""
    kind = doc.get("kind")
    if kind in CRD_SCHEMAS:
        found = list(crd_validator(kind).iter_errors(doc))
        found += object_meta_validator().iter_errors(doc.get("metadata", {}))
    else:
        try:
            found = list(builtin_validator(doc.get("apiVersion"), kind).iter_errors(doc))
        except FileNotFoundError:
            return [f"no Kubernetes {KUBERNETES_VERSION} schema for {doc.get('apiVersion')} {kind}"]
    return [f"{kind} {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in found]


def manifest_files() -> list[Path]:
    """Every file a kustomization under infra/k8s takes as a resource (or, for the fallback
    overlays, the generated RayJob it puts in a ConfigMap), and the Secret examples."""
    found = set(K8S.glob("secrets/*.example.yaml"))
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        names = list(spec.get("resources", []))
        names += [f for gen in spec.get("configMapGenerator", []) for f in gen.get("files", [])]
        found |= {kustomization.parent / n for n in names if (kustomization.parent / n).is_file()}
    return sorted(found)


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def builds() -> dict[str, list[dict]]:
    """Each overlay as `kubectl kustomize` builds it (the four at once)."""
    if not shutil.which("kubectl") and not shutil.which("kustomize"):
        pytest.skip("no kubectl (or kustomize) on PATH to build the overlays")
    with ThreadPoolExecutor(len(OVERLAYS)) as pool:
        built = pool.map(lambda o: deploy.kustomize_build(K8S / "overlays" / o), OVERLAYS)
        return dict(zip(OVERLAYS, built))


def test_every_manifest_file_validates_strictly():
    files = manifest_files()
    assert len(files) >= 13
    errors = [f"{path.relative_to(REPO)}: {e}" for path in files for doc in load_all(path)
              for e in schema_errors(doc)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_builds_and_validates_strictly(builds, overlay):
    docs = builds[overlay]
    errors = [e for doc in docs for e in schema_errors(doc)]
    assert not errors, "\n".join(errors)
    kinds = sorted(doc["kind"] for doc in docs)
    nightly = ["RayCronJob"] if not overlay.endswith("-cronjob") else \
        ["ConfigMap", "CronJob", "Role", "RoleBinding", "ServiceAccount"]
    assert kinds == sorted(["Namespace", "ConfigMap", "Deployment", "Service", "RayService",
                            *nightly])
    assert {doc["metadata"].get("namespace") for doc in docs if doc["kind"] != "Namespace"} \
        == {"r2ray"}


def test_the_strict_check_names_unknown_fields():
    """The validators are not vacuous: a misspelt or misplaced field fails, a correct one passes."""
    cronjob = load_all(K8S / "base" / "raycronjob.yaml")[0]
    assert schema_errors(cronjob) == []
    cronjob["spec"]["jobTemplate"]["shutdownAfterJobFinish"] = True
    cronjob["spec"]["jobTemplate"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]["workdir"] = "/"
    cronjob["metadata"]["labls"] = {}
    assert sorted(e.split(": ")[1] for e in schema_errors(cronjob)) == [
        "Additional properties are not allowed ('labls' was unexpected)",
        "Additional properties are not allowed ('shutdownAfterJobFinish' was unexpected)",
        "Additional properties are not allowed ('workdir' was unexpected)"]
    deployment = load_all(K8S / "base" / "mlflow.yaml")[0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["httpGet"]["pth"] = "/"
    assert "'pth' was unexpected" in schema_errors(deployment)[0]


def test_serve_config_v2_is_serve_config_yaml_rendered():
    """One source of truth: the committed RayService is what `make infra` renders now, and its
    Serve config is serve/config.yaml but for the declared overrides."""
    committed = (REPO / deploy.RAYSERVICE).read_text()
    assert committed == deploy.rendered_rayservice(REPO), \
        "infra/k8s/base/rayservice.yaml is out of date with serve/config.yaml: run `make infra`"
    overrides = yaml.safe_load((REPO / deploy.SERVE_OVERRIDES).read_text())
    ours = deploy.serve_config_v2(load_all(REPO / deploy.RAYSERVICE)[0])
    source = yaml.safe_load((REPO / deploy.SERVE_CONFIG).read_text())
    for path, value in overrides.items():
        deploy.set_path(source, path, value)
    assert ours == source


def test_serve_config_validation_rejects_what_ray_or_r2ray_would():
    from r2ray.errors import ConfigError

    def config(**args):
        return {"applications": [{"name": "r2ray", "import_path": "serve.app:app", "args": args}]}

    deploy.validate_serve_config(config(model="models:/r2ray@champion"))
    with pytest.raises(ConfigError, match="router_cpus"):
        deploy.validate_serve_config(config(router_cpus=-1))
    with pytest.raises(ConfigError, match="modle"):
        deploy.validate_serve_config(config(modle="models:/r2ray@champion"))
    with pytest.raises(ConfigError, match="applications.r2ray.route_prefx"):
        deploy.validate_serve_config({"applications": [
            {"name": "r2ray", "import_path": "serve.app:app", "route_prefx": "/"}]})
    with pytest.raises(ConfigError, match="ServeDeploySchema"):
        deploy.validate_serve_config({"applications": [{"name": "r2ray"}]})


def test_serve_config_validation_names_unknown_keys_at_every_depth():
    """Ray Serve's nested schemas (http_options, deployments, ray_actor_options) drop an unknown
    key without a word, so a misspelt `port` would leave Serve on its default: each is named."""
    from r2ray.errors import ConfigError

    config = yaml.safe_load((REPO / deploy.SERVE_CONFIG).read_text())
    deploy.validate_serve_config(config)
    config["http_options"]["prot"] = 9000
    config["grpc_options"] = {"prt": 9001}
    config["applications"][0]["deployments"] = [
        {"name": "Router", "num_replicass": 2, "ray_actor_options": {"num_cpu": 1}},
        {"name": "Pacer", "num_replicas": 1}]
    with pytest.raises(ConfigError) as raised:
        deploy.validate_serve_config(config)
    assert sorted(str(raised.value).splitlines()[1:]) == [
        "  applications.r2ray.deployments.Router.num_replicass",
        "  applications.r2ray.deployments.Router.ray_actor_options.num_cpu",
        "  grpc_options.prt", "  http_options.prot"]


def test_fallback_rayjobs_are_the_raycronjobs_templates(builds):
    """The RayJob each *-cronjob overlay's CronJob creates is what `make infra` renders from the
    overlay it wraps (the committed file is current), and the CronJob mounts that ConfigMap."""
    for overlay, wrapped in deploy.CRONJOB_OVERLAYS.items():
        committed = (K8S / "overlays" / overlay / "rayjob.yaml").read_text()
        expected = deploy.rayjob_file(builds[wrapped], f"infra/k8s/overlays/{wrapped}")
        assert committed == expected, f"overlays/{overlay}/rayjob.yaml is out of date: make infra"
        docs = {doc["kind"]: doc for doc in builds[overlay]}
        configmaps = [d for d in builds[overlay] if d["kind"] == "ConfigMap"
                      and d["metadata"]["name"].startswith("r2ray-nightly-rayjob")]
        rayjob = yaml.safe_load(configmaps[0]["data"]["rayjob.yaml"])
        cronjob = [d for d in builds[wrapped] if d["kind"] == "RayCronJob"][0]
        assert rayjob["spec"] == cronjob["spec"]["jobTemplate"]
        pod = docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["volumes"][0]["configMap"]["name"] == configmaps[0]["metadata"]["name"]
        assert pod["containers"][0]["args"][-1] == "/etc/r2ray-nightly/rayjob.yaml"
        assert docs["CronJob"]["spec"]["schedule"] == cronjob["spec"]["schedule"]
        assert docs["CronJob"]["spec"]["timeZone"] == cronjob["spec"]["timeZone"]


def job_specs(builds) -> dict[str, dict]:
    """Every RayJob spec that can run: each RayCronJob's template, each generated RayJob."""
    specs = {}
    for overlay, docs in builds.items():
        for doc in docs:
            if doc["kind"] == "RayCronJob":
                specs[f"{overlay} RayCronJob"] = doc["spec"]["jobTemplate"]
            elif doc["kind"] == "ConfigMap" and "rayjob.yaml" in doc.get("data", {}):
                specs[f"{overlay} RayJob"] = yaml.safe_load(doc["data"]["rayjob.yaml"])["spec"]
    return specs


def expand(entrypoint: str) -> list[str]:
    """The argv the RayJob submitter's bash runs: KubeRay puts the entrypoint unquoted in a bash
    command line, so command substitutions (the run date) are expanded there."""
    done = subprocess.run(["bash", "-c", f"printf '%s\\0' {entrypoint}"], capture_output=True,
                          text=True, timeout=10, check=True)
    return done.stdout.split("\0")[:-1]


def cpus(quantity: str) -> float:
    """A Kubernetes CPU quantity ("4", "500m") in CPUs."""
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_entrypoints_expand_and_parse_with_the_r2ray_cli(builds):
    from r2ray.cli import build_parser

    specs = job_specs(builds)
    assert len(specs) == 4
    now = datetime.now(timezone.utc)
    nights = {(now - timedelta(days=d)).date().isoformat() for d in (1, 2)}  # 2: a midnight race
    for name, spec in specs.items():
        argv = expand(spec["entrypoint"])
        assert argv[:2] == ["python", "jobs/route_batch.py"], name
        args = build_parser().parse_args(["route", *argv[2:]])
        night = args.run_id.removeprefix("nightly-")
        assert night in nights and args.input == f"s3://r2ray-backlog/{night}/", name
        assert re.fullmatch(r"models:/[\w-]+@\w+", args.model), name  # loaded by alias
        assert args.budget_usd > 0 and args.output.startswith("s3://"), name
        workers = spec["rayClusterSpec"]["workerGroupSpecs"]
        gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                       .get("nvidia.com/gpu", 0)) * g["replicas"] for g in workers)
        assert (args.gpus_per_worker or 0) * args.workers <= gpus, name
        # the README's pool rule: the actors leave a CPU per node for the tasks that feed them
        # (KubeRay gives Ray a pod's CPU limit, else its request, as num-cpus)
        room = sum((cpus(g["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"])
                    - 1) * g["replicas"] for g in workers)
        assert args.workers * args.cpus_per_worker <= room, name
        assert bool(args.gpus_per_worker) == ("gpu" in name), name
        assert spec["shutdownAfterJobFinishes"] is True
        assert 0 < spec["activeDeadlineSeconds"] < 24 * 3600  # never overlaps the next night


def ray_pin() -> str:
    pyproject = (REPO / "pyproject.toml").read_text()
    return re.search(r'"ray\[[^\]]*\]==([\d.]+)"', pyproject).group(1)


def r2ray_images(text: str) -> list[str]:
    return re.findall(r"image:\s*\"?((?:[\w.-]+/)*r2ray:[\w.-]+)", text)


def test_one_ray_version_everywhere(builds):
    import ray

    pin = ray_pin()
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)[1]
    assert ray.__version__ == pin
    dockerfile = (REPO / "infra" / "docker" / "Dockerfile").read_text()
    assert re.findall(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M) == [pin]
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-${VARIANT}" in dockerfile
    texts = [p.read_text() for p in manifest_files()]
    texts += [yaml.safe_dump(d) for docs in builds.values() for d in docs]
    texts.append((REPO / "infra" / "local" / "docker-compose.yml").read_text())
    ray_versions = {v for t in texts for v in re.findall(r"rayVersion:\s*['\"]?([\d.]+)", t)}
    assert ray_versions == {pin}
    tags = {image.split(":")[-1] for t in texts for image in r2ray_images(t)}
    assert tags == {f"{version}-ray{pin}-cpu", f"{version}-ray{pin}-gpu"}
    compose = yaml.safe_load((REPO / "infra" / "local" / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        if "build" in service:
            assert service["build"]["args"]["RAY_VERSION"] == pin


def test_secrets_are_examples_referenced_by_name(builds):
    """The manifests create no Secret; every Secret they name has a committed example, with
    placeholder values only."""
    examples = {}
    for path in K8S.glob("secrets/*.example.yaml"):
        doc = load_all(path)[0]
        assert doc["kind"] == "Secret" and path.name == f"{doc['metadata']['name']}.example.yaml"
        assert all(PLACEHOLDER.search(v) for v in doc["stringData"].values()), path.name
        examples[doc["metadata"]["name"]] = doc
    named = set()
    for docs in builds.values():
        assert not [d for d in docs if d["kind"] == "Secret"]
        text = yaml.safe_dump_all(docs)
        named |= set(re.findall(r"secretRef:\s*\n\s*name: (\S+)", text))
        named |= set(re.findall(r"secretKeyRef:\s*\n(?:\s*\w+: \S+\n)*?\s*name: (\S+)", text))
    assert named == set(examples)


def test_one_torch_version_everywhere():
    """`make setup` and the images install the same torch, the one installed here (its public
    version: a +cpu build is the same release)."""
    import torch

    makefile = (REPO / "Makefile").read_text()
    dockerfile = (REPO / "infra" / "docker" / "Dockerfile").read_text()
    pins = set(re.findall(r"pip install -q torch==([\d.]+)", makefile))
    pins |= set(re.findall(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.M))
    assert pins == {torch.__version__.split("+")[0]}
