"""OME's real CRDs (../shared/data/ome beside the repo) as JSON Schemas, to validate the manifests
servetune generates with ``jsonschema`` (no Kubernetes API server runs here).

The conversion follows the Kubernetes structural-schema rules (kubernetes.io/docs/tasks/
extend-kubernetes/custom-resources/custom-resource-definitions/#specifying-a-structural-schema):
``nullable`` admits null, ``x-kubernetes-int-or-string`` admits an integer or a string,
``x-kubernetes-preserve-unknown-fields`` keeps unknown fields. Every other object rejects fields
its schema does not name: the API server would silently prune them, which is how a tuner's flag
can vanish from a manifest, so the tests treat them as errors.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
OME_DIR = REPO_ROOT / ".." / "shared" / "data" / "ome"
"""OME's CRDs and samples (sgl-project/ome, Apache-2.0), kept beside the clone."""
CRD_FILES = {
    "InferenceService": "ome.io_inferenceservices.yaml",
    "ClusterServingRuntime": "ome.io_clusterservingruntimes.yaml",
    "ClusterBaseModel": "ome.io_clusterbasemodels.yaml",
}
DNS_1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
"""Names of namespaced services (an InferenceService names its Kubernetes Service)."""
DNS_1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
"""Names of cluster-scoped objects (ClusterServingRuntime, ClusterBaseModel)."""


def _convert(node: Any) -> Any:
    if isinstance(node, list):
        return [_convert(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _convert(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    out.pop("nullable", None)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd(kind: str) -> dict[str, Any]:
    """The CRD document of ``kind`` (InferenceService, ClusterServingRuntime, ClusterBaseModel)."""
    path = OME_DIR / CRD_FILES[kind]
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the tests need OME's CRDs in ../shared/data/ome beside the repo"
        )
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 10x faster on 1.8 MB
    data: dict[str, Any] = yaml.load(path.read_text(), Loader=loader)
    return data


@functools.cache
def json_schema(kind: str) -> dict[str, Any]:
    """The served version's openAPIV3Schema of ``kind`` as a JSON Schema (draft 2020-12), with
    apiVersion and kind pinned and metadata.name a DNS-1035 label."""
    doc = crd(kind)
    (version,) = [v for v in doc["spec"]["versions"] if v.get("served") and v.get("storage")]
    schema: dict[str, Any] = _convert(version["schema"]["openAPIV3Schema"])
    props = schema["properties"]
    props["apiVersion"] = {"const": f"{doc['spec']['group']}/{version['name']}"}
    props["kind"] = {"const": doc["spec"]["names"]["kind"]}
    props["metadata"] = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "pattern": DNS_1035, "maxLength": 63}
            if doc["spec"]["scope"] == "Namespaced"
            else {"type": "string", "pattern": DNS_1123_SUBDOMAIN, "maxLength": 253},
            "namespace": {"type": "string", "pattern": DNS_1035, "maxLength": 63},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    return schema


def errors(obj: dict[str, Any]) -> list[str]:
    """Every schema error of ``obj`` against its kind's CRD, as ``path: message`` lines."""
    kind = obj.get("kind")
    if kind not in CRD_FILES:
        return [f"kind: {kind!r} is not one of {sorted(CRD_FILES)}"]
    validator = jsonschema.Draft202012Validator(json_schema(str(kind)))
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.path)))
    ]


def samples() -> list[dict[str, Any]]:
    """OME's own sample resources (every document of every samples/*.yaml)."""
    docs = []
    for path in sorted((OME_DIR / "samples").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs
