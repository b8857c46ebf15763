"""deploy/, checked offline: the KubeRay manifests parse, use only fields KubeRay's CRDs (and the Kubernetes
types they embed) define, name only the example Secrets, hold no credentials, carry the Ray token to every
Ray container, and pin the Ray and Python this venv runs; the Dockerfile pins the same; the RayJobs'
entrypoints parse with our CLI; the RayService's Serve config validates with Ray Serve's own schema.

No cluster or container runtime is involved. The allowed fields are deploy/k8s/schema/fields.json (see
extract_fields.py there for where they come from).
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import json
import re
import shlex
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SCHEMA_DIR = K8S / "schema"
FIELDS = json.loads((SCHEMA_DIR / "fields.json").read_text())
MANIFESTS = sorted(K8S.glob("*.yaml"))
EXAMPLE_SECRETS = K8S / "secrets.example.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"

AUTH_SECRET, AUTH_KEY = "ray-auth-token", "auth_token"
IMAGE_TAG = re.compile(r":(?P<project>[\w.]+)-ray(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+\.\d+)-(?P<variant>cpu|cuda)$")
PLACEHOLDER = "REPLACE_ME"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_docs(include_example: bool = False) -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, d) for p in MANIFESTS if include_example or p != EXAMPLE_SECRETS for d in _docs(p)]


def _kind(doc: dict[str, Any]) -> str:
    return f"{doc.get('apiVersion')}/{doc.get('kind')}"


# --- the field check ---------------------------------------------------------------------------------------

def _check(value: Any, ref: str, path: str) -> Iterator[str]:
    """Problems of `value` against the type notation `ref` of fields.json (see its "notation")."""
    if value is None or ref == "any":
        return
    if ref.startswith("[]"):
        if not isinstance(value, list):
            yield f"{path}: expected a list, got {type(value).__name__}"
            return
        for i, item in enumerate(value):
            yield from _check(item, ref[2:], f"{path}[{i}]")
    elif ref.startswith("{}"):
        if not isinstance(value, dict):
            yield f"{path}: expected a map, got {type(value).__name__}"
            return
        for key, item in value.items():
            yield from _check(item, ref[2:], f"{path}.{key}")
    elif ref == "":
        if isinstance(value, (dict, list)):
            yield f"{path}: expected a single value, got a {type(value).__name__}"
    else:
        if not isinstance(value, dict):
            yield f"{path}: expected an object ({ref}), got {type(value).__name__}"
            return
        fields = FIELDS["types"][ref]
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if key not in fields:
                close = difflib.get_close_matches(str(key), fields, n=1)
                yield f"{where}: unknown field of {ref}" + (f" (did you mean '{close[0]}'?)" if close else "")
            else:
                yield from _check(item, fields[key], where)


def field_errors(doc: dict[str, Any]) -> list[str]:
    root = FIELDS["roots"].get(_kind(doc))
    if root is None:
        return [f"{_kind(doc)}: not a kind fields.json knows ({sorted(FIELDS['roots'])})"]
    return list(_check(doc, root, ""))


def test_manifests_parse_into_the_expected_kinds() -> None:
    kinds = sorted(f"{name}:{doc['kind']}" for name, doc in _all_docs(include_example=True))
    assert kinds == ["raycluster.yaml:RayCluster", "rayjob-extract.yaml:RayJob", "rayjob-train.yaml:RayJob",
                     "rayservice-serve.yaml:RayService", "secrets.example.yaml:Secret",
                     "secrets.example.yaml:Secret", "secrets.example.yaml:Secret"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_use_only_crd_fields(path: Path) -> None:
    for doc in _docs(path):
        assert field_errors(doc) == [], f"{path.name}: {doc['kind']} {doc['metadata']['name']}"


def _raycluster() -> dict[str, Any]:
    return copy.deepcopy(_docs(K8S / "raycluster.yaml")[0])


def test_field_check_catches_a_misspelled_field() -> None:
    doc = _raycluster()
    doc["spec"]["headGroupSpec"]["rayStartParms"] = doc["spec"]["headGroupSpec"].pop("rayStartParams")
    assert field_errors(doc) == [
        "spec.headGroupSpec.rayStartParms: unknown field of HeadGroupSpec (did you mean 'rayStartParams'?)"]


def test_field_check_names_each_problem() -> None:
    doc = _raycluster()
    doc["spec"]["headGroupSpec"]["rayStartParms"] = doc["spec"]["headGroupSpec"].pop("rayStartParams")
    template = doc["spec"]["workerGroupSpecs"][0]["template"]
    template["metadata"]["generateName"] = "x-"  # the CRDs keep only name/namespace/labels/annotations/finalizers
    template["spec"]["containers"][0]["resources"]["limit"] = {"cpu": "1"}
    doc["spec"]["workerGroupSpecs"][1] = {"groupName": "cpu", "template": []}
    doc["spec"]["headGroupSpec"]["serviceType"] = {"type": "ClusterIP"}
    job = copy.deepcopy(_docs(K8S / "rayjob-train.yaml")[0])
    job["spec"]["entryPoint"] = job["spec"].pop("entrypoint")
    errors = sorted(field_errors(doc) + field_errors(job))
    assert errors == sorted([
        "spec.headGroupSpec.rayStartParms: unknown field of HeadGroupSpec (did you mean 'rayStartParams'?)",
        "spec.workerGroupSpecs[0].template.metadata.generateName: unknown field of EmbeddedObjectMeta",
        "spec.workerGroupSpecs[0].template.spec.containers[0].resources.limit: unknown field of "
        "ResourceRequirements (did you mean 'limits'?)",
        "spec.workerGroupSpecs[1].template: expected an object (PodTemplateSpec), got list",
        "spec.headGroupSpec.serviceType: expected a single value, got a dict",
        "spec.entryPoint: unknown field of RayJobSpec (did you mean 'entrypoint'?)",
    ])
    assert field_errors({"apiVersion": "ray.io/v1alpha1", "kind": "RayCluster"})[0].startswith(
        "ray.io/v1alpha1/RayCluster: not a kind")


STRING_MAPS = {"rayStartParams", "labels", "annotations", "headServiceAnnotations", "clusterSelector"}


def non_strings(node: Any, path: str = "") -> Iterator[str]:
    """Values that Kubernetes takes as strings only (map[string]string, env values) but YAML reads otherwise:
    `num-cpus: 0` is rejected by the API server, `num-cpus: "0"` is not."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from non_strings(item, f"{path}[{i}]")
    elif isinstance(node, dict):
        if isinstance(node.get("name"), str) and "value" in node and not isinstance(node["value"], str):
            yield f"{path}.value"
        for key, value in node.items():
            where = f"{path}.{key}" if path else key
            if key in STRING_MAPS and isinstance(value, dict):
                yield from (f"{where}.{k}" for k, v in value.items() if not isinstance(v, str))
            else:
                yield from non_strings(value, where)


def test_string_maps_hold_strings() -> None:
    for name, doc in _all_docs(include_example=True):
        assert list(non_strings(doc)) == [], name
    doc = _raycluster()
    doc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"][0]["value"] = 1
    assert list(non_strings(doc)) == ["spec.headGroupSpec.rayStartParams.num-cpus",
                                      "spec.headGroupSpec.template.spec.containers[0].env[0].value"]


# --- the schema file and its script ------------------------------------------------------------------------

def _extract_fields() -> Any:
    spec = importlib.util.spec_from_file_location("extract_fields", SCHEMA_DIR / "extract_fields.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fields_json_holds_the_scripts_kuberay_types() -> None:
    script = _extract_fields()
    assert FIELDS["roots"] == script.ROOTS
    assert FIELDS["sources"] == script.SOURCES
    for name, fields in script.KUBERAY_TYPES.items():
        assert FIELDS["types"][name] == fields, name
    referred = {ref.lstrip("[]{}") for fields in FIELDS["types"].values() for ref in fields.values()}
    assert referred - {"", "any"} <= set(FIELDS["types"])


def test_crd_comparison_reports_both_sides() -> None:
    """--compare-crd on a tiny CRD: the paths it has that fields.json lacks, and the other way round."""
    script = _extract_fields()
    string, strings = {"type": "string"}, {"type": "object", "additionalProperties": {"type": "string"}}
    crd = {"kind": "CustomResourceDefinition", "spec": {
        "group": "ray.io", "names": {"kind": "RayCluster"},
        "versions": [{"name": "v1", "storage": True, "schema": {"openAPIV3Schema": {"properties": {
            "apiVersion": string, "kind": string, "metadata": {"type": "object"},
            "status": {"properties": {"state": string}},
            "spec": {"properties": {
                "rayVersion": string, "newField": string,
                "workerGroupSpecs": {"type": "array", "items": {"properties": {
                    "groupName": string, "rayStartParams": strings}}}}}}}}}]}}
    fields = {"roots": {"ray.io/v1/RayCluster": "RayCluster"}, "types": {
        "RayCluster": {"apiVersion": "", "kind": "", "metadata": "ObjectMeta", "spec": "Spec"},
        "ObjectMeta": {"name": ""},
        "Spec": {"rayVersion": "", "suspend": "", "workerGroupSpecs": "[]Group"},
        "Group": {"groupName": "", "rayStartParams": "{}"}}}
    only_crd, only_ours = script.compare(fields, crd)
    assert only_crd == {"spec.newField"}
    assert only_ours == {"spec.suspend"}
    assert "spec.workerGroupSpecs[].rayStartParams" in script.flatten_types(fields["types"], "RayCluster")


# --- Secrets, the Ray token, credentials -------------------------------------------------------------------

def _example_secrets() -> dict[str, set[str]]:
    return {d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {}))
            for d in _docs(EXAMPLE_SECRETS)}


def secret_refs(node: Any, path: str = "") -> Iterator[tuple[str, str, str | None]]:
    """(where, secret name, key or None) of every Secret a manifest names."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from secret_refs(item, f"{path}[{i}]")
    elif isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else key
            if key == "secretRef":
                yield where, value.get("name"), None
            elif key == "secretKeyRef":
                yield where, value.get("name"), value.get("key")
            elif key == "authOptions" and "secretName" in value:
                yield where, value["secretName"], AUTH_KEY
            elif key == "secret" and isinstance(value, dict) and "secretName" in value:  # a volume
                yield where, value["secretName"], None
            yield from secret_refs(value, where)


def test_secret_references_name_the_example_secrets() -> None:
    secrets = _example_secrets()
    assert secrets == {"actstore-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
                       AUTH_SECRET: {AUTH_KEY}, "actstore-api-token": {"ACTSTORE_TOKEN"}}
    seen = set()
    for name, doc in _all_docs():
        for where, secret, key in secret_refs(doc):
            assert secret in secrets, f"{name}: {where} names Secret {secret!r}, not one of secrets.example.yaml"
            assert key is None or key in secrets[secret], f"{name}: {where}: {secret} has no key {key!r}"
            seen.add(secret)
    assert seen == set(secrets), "an example Secret that no manifest uses"


def _cluster_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]
    return [s for s in (spec if doc["kind"] == "RayCluster" else spec.get("rayClusterSpec"),
                        spec.get("rayClusterConfig")) if s]


def _pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for cluster in _cluster_specs(doc):
        yield "head", cluster["headGroupSpec"]["template"]
        for group in cluster.get("workerGroupSpecs", []):
            yield group["groupName"], group["template"]
    if "submitterPodTemplate" in doc["spec"]:
        yield "submitter", doc["spec"]["submitterPodTemplate"]


def _has_ray_token(env: list[dict[str, Any]]) -> bool:
    by_name = {e["name"]: e for e in env or []}
    mode, token = by_name.get("RAY_AUTH_MODE", {}), by_name.get("RAY_AUTH_TOKEN", {})
    return mode.get("value") == "token" and token.get("valueFrom", {}).get("secretKeyRef") == {
        "name": AUTH_SECRET, "key": AUTH_KEY}


def test_every_ray_container_carries_the_ray_token() -> None:
    """Ray 2.60 with RAY_AUTH_MODE=token: head, workers, job submitters and the autoscaler all need the token."""
    for name, doc in _all_docs():
        for cluster in _cluster_specs(doc):
            assert cluster["authOptions"] == {"mode": "token", "secretName": AUTH_SECRET}, name
            if cluster.get("enableInTreeAutoscaling"):
                assert _has_ray_token(cluster["autoscalerOptions"]["env"]), f"{name}: autoscaler"
        for group, template in _pod_templates(doc):
            for container in template["spec"]["containers"]:
                assert _has_ray_token(container.get("env")), f"{name}: {group}: {container['name']}"


SENSITIVE_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL", re.I)
CREDENTIAL_TEXT = [
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"aws_secret_access_key\s*[:=]\s*['\"]?(?!" + PLACEHOLDER + r")[A-Za-z0-9/+=]{16,}", re.I),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def credential_problems(text: str, docs: list[dict[str, Any]]) -> list[str]:
    problems = [f"looks like a credential: {m.group(0)[:12]}..." for pattern in CREDENTIAL_TEXT
                for m in pattern.finditer(text)]

    def walk(node: Any, path: str) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{path}[{i}]")
        elif isinstance(node, dict):
            if isinstance(node.get("name"), str) and SENSITIVE_ENV.search(node["name"]) and "value" in node:
                problems.append(f"{path}: {node['name']} has a literal value (use valueFrom.secretKeyRef)")
            for key, value in node.items():
                walk(value, f"{path}.{key}")

    for doc in docs:
        if doc.get("kind") == "Secret":
            values = {**doc.get("stringData", {}), **doc.get("data", {})}
            problems += [f"Secret {doc['metadata']['name']}: {k} is not {PLACEHOLDER}"
                         for k, v in values.items() if v != PLACEHOLDER]
        else:
            walk(doc, doc.get("kind", "?"))
    return problems


def test_no_credentials_in_deploy_files() -> None:
    """deploy/k8s, deploy/docker and deploy/README.md (deploy/local's throwaway local credentials are its own)."""
    files = [*(K8S.rglob("*")), *(DEPLOY / "docker").rglob("*"), DEPLOY / "README.md"]
    for path in sorted(p for p in files if p.is_file() and "__pycache__" not in p.parts):
        docs = _docs(path) if path.suffix == ".yaml" else []
        assert credential_problems(path.read_text(), docs) == [], path


def test_credential_check_catches_literals() -> None:
    fake_id = "AKIA" + "Q" * 16  # built here so that this file holds nothing key-like itself
    job = copy.deepcopy(_docs(K8S / "rayjob-train.yaml")[0])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "x" * 40})
    secrets = copy.deepcopy(_docs(EXAMPLE_SECRETS))
    secrets[0]["stringData"]["AWS_ACCESS_KEY_ID"] = fake_id
    text = f"aws_secret_access_key = {'w' * 40}\n"
    problems = credential_problems(text, [job, *secrets])
    assert len(problems) == 3, problems
    assert any("AWS_SECRET_ACCESS_KEY has a literal value" in p for p in problems)
    assert any("Secret actstore-s3: AWS_ACCESS_KEY_ID is not" in p for p in problems)
    assert credential_problems(fake_id, []) == [f"looks like a credential: {fake_id[:12]}..."]


# --- versions ----------------------------------------------------------------------------------------------

def _images(node: Any) -> Iterator[tuple[str, bool]]:
    """(image, asks for a GPU) of every container and init container under `node`."""
    if isinstance(node, list):
        for item in node:
            yield from _images(item)
    elif isinstance(node, dict):
        if "image" in node and "name" in node:
            resources = node.get("resources") or {}
            gpu = any("nvidia.com/gpu" in (resources.get(k) or {}) for k in ("limits", "requests"))
            yield node["image"], gpu
        for value in node.values():
            yield from _images(value)


def _dockerfile_arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert m, f"Dockerfile: no ARG {name}=..."
    return m.group(1)


def test_ray_and_python_versions_agree_everywhere() -> None:
    import ray

    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    minimum = [s.version for s in Requirement("python" + project["requires-python"]).specifier
               if s.operator == ">="]
    assert minimum == [python], "pyproject's requires-python minimum is not the venv's Python"
    ray_req = next(Requirement(d) for d in project["dependencies"] if Requirement(d).name == "ray")
    assert ray_req.specifier.contains(ray.__version__, prereleases=True)

    assert _dockerfile_arg("RAY_VERSION") == ray.__version__
    assert _dockerfile_arg("PYTHON_VERSION") == python
    images = 0
    for name, doc in _all_docs():
        for cluster in _cluster_specs(doc):
            assert cluster["rayVersion"] == ray.__version__, name
        for image, gpu in _images(doc):
            m = IMAGE_TAG.search(image)
            assert m, f"{name}: image {image} is not tagged <version>-ray<ray>-py<python>-<cpu|cuda>"
            assert (m["project"], m["ray"], m["py"]) == (project["version"], ray.__version__, python), image
            assert not gpu or m["variant"] == "cuda", f"{name}: a GPU container on {image}"
            images += 1
    assert images >= 10


# --- what runs: the CLI entrypoints and the Serve config ---------------------------------------------------

@pytest.mark.parametrize("manifest", ["rayjob-extract.yaml", "rayjob-train.yaml"])
def test_rayjob_entrypoints_parse_with_our_cli(manifest: str) -> None:
    from actstore_cli import build_parser

    argv = shlex.split(_docs(K8S / manifest)[0]["spec"]["entrypoint"])
    assert argv[0] == "actstore"
    args = build_parser(argv[1]).parse_args(argv[1:])  # argparse exits (SystemExit) on an unknown flag
    assert args.command == manifest.removeprefix("rayjob-").removesuffix(".yaml")


def _serve_config() -> dict[str, Any]:
    return yaml.safe_load(_docs(K8S / "rayservice-serve.yaml")[0]["spec"]["serveConfigV2"])


def serve_config_problems(config: dict[str, Any]) -> list[str]:
    """Ray Serve's own validation of a serveConfigV2, plus unknown key names, which its schema lets through
    (it ignores them, for forward compatibility)."""
    import pydantic
    from ray.serve.schema import (DeploymentSchema, RayActorOptionsSchema, ServeApplicationSchema,
                                  ServeDeploySchema)

    try:
        ServeDeploySchema.model_validate(config)
    except pydantic.ValidationError as e:
        return [" ".join(str(e).split())]

    def unknown(node: dict[str, Any], model: Any, where: str) -> list[str]:
        known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
        return [f"{where}.{key}: not a field of {model.__name__}" for key in node if key not in known]

    problems = unknown(config, ServeDeploySchema, "")
    for i, app in enumerate(config["applications"]):
        problems += unknown(app, ServeApplicationSchema, f"applications[{i}]")
        for j, deployment in enumerate(app.get("deployments", [])):
            where = f"applications[{i}].deployments[{j}]"
            problems += unknown(deployment, DeploymentSchema, where)
            problems += unknown(deployment.get("ray_actor_options", {}), RayActorOptionsSchema,
                                where + ".ray_actor_options")
    return problems


def test_serve_config_validates_with_ray_serve() -> None:
    config = _serve_config()
    assert serve_config_problems(config) == []
    assert config["applications"][0]["args"]["index"] == "/data/index"  # where the init containers copy it
    deployment = config["applications"][0]["deployments"][0]
    deployment["num_replica"] = deployment.pop("num_replicas")
    deployment["ray_actor_options"]["num_cpu"] = 1
    assert serve_config_problems(config) == [
        "applications[0].deployments[0].num_replica: not a field of DeploymentSchema",
        "applications[0].deployments[0].ray_actor_options.num_cpu: not a field of RayActorOptionsSchema"]
    del config["applications"][0]["import_path"]
    assert "import_path" in serve_config_problems(config)[0]


def test_serve_import_path_exists() -> None:
    import ast

    module, _, name = _serve_config()["applications"][0]["import_path"].partition(":")
    source = ROOT / (module.replace(".", "/") + ".py")
    tree = ast.parse(source.read_text())
    assert name in {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))} | {
        t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
