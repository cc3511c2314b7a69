"""Regenerate the JSON schemas that kubeconform validates k8s/ against, offline.

kubeconform normally downloads its schemas from GitHub, which CI cannot reach. This script
builds them from two Go modules that the Go module proxy serves (so the inputs are pinned by
version and checked by go.sum's checksum database):

- k8s.io/kubernetes@K8S_VERSION: api/openapi-spec/swagger.json, the API server's own
  OpenAPI document. Each kind we deploy becomes a "standalone strict" schema (every $ref
  inlined, unknown fields rejected), the layout kubeconform expects for Kubernetes kinds.
- github.com/ray-project/kuberay/ray-operator@KUBERAY_VERSION: config/crd/bases/*.yaml, the
  KubeRay CRDs. Each served version's openAPIV3Schema becomes a strict JSON schema under
  {group}/{kind}_{version}.json.

Usage (needs `go` and network access to the Go proxy; run from the repo root):
    python scripts/gen_k8s_schemas.py            # rewrite k8s/schemas/
A kind that k8s/ starts using must be added to KINDS below; kubeconform then fails with
"could not find schema" until this script has been re-run.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

K8S_VERSION = "1.37.2"
KUBERAY_VERSION = "1.5.0"
OUT = Path(__file__).resolve().parent.parent / "k8s" / "schemas"

# (group, version, kind) of every built-in kind that k8s/ renders.
KINDS = [
    ("", "v1", "Namespace"),
    ("", "v1", "ConfigMap"),
    ("", "v1", "Secret"),
    ("", "v1", "Service"),
    ("", "v1", "ServiceAccount"),
    ("", "v1", "PersistentVolumeClaim"),
    ("apps", "v1", "Deployment"),
    ("batch", "v1", "Job"),
    ("policy", "v1", "PodDisruptionBudget"),
    ("autoscaling", "v2", "HorizontalPodAutoscaler"),
]

INT_OR_STRING = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
QUANTITY = {"oneOf": [{"type": "string"}, {"type": "number"}]}


def module_dir(module: str, version: str) -> Path:
    """Download a module through the Go proxy (checksum-verified) and return its directory."""
    out = subprocess.run(
        ["go", "mod", "download", "-json", f"{module}@{version}"],
        check=True,
        capture_output=True,
        text=True,
        env={**_env(), "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod"},
    ).stdout
    return Path(json.loads(out)["Dir"])


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def kind_suffix(group: str, version: str) -> str:
    """kubeconform's {{ .KindSuffix }}: -version, or -firstlabelofgroup-version."""
    return f"-{group.split('.')[0]}-{version}" if group else f"-{version}"


def _strict(schema: Any) -> Any:
    """Reject unknown fields wherever properties are declared (kubeconform -strict)."""
    if isinstance(schema, dict):
        for value in schema.values():
            _strict(value)
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)
    return schema


def _drop_descriptions(schema: Any) -> Any:
    """Descriptions are most of the bytes and play no part in validation."""
    if isinstance(schema, dict):
        schema.pop("description", None)
        for key, value in schema.items():
            if key != "properties":
                _drop_descriptions(value)
            else:
                for prop in value.values():
                    _drop_descriptions(prop)
    elif isinstance(schema, list):
        for value in schema:
            _drop_descriptions(value)
    return schema


def _inline(schema: Any, definitions: dict[str, Any], stack: tuple[str, ...] = ()) -> Any:
    """Replace every swagger $ref by the definition it names (standalone schemas)."""
    if isinstance(schema, list):
        return [_inline(v, definitions, stack) for v in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if ref is not None:
        name = ref.rsplit("/", 1)[-1]
        if name.endswith("util.intstr.IntOrString"):
            return dict(INT_OR_STRING)
        if name.endswith("api.resource.Quantity"):
            return dict(QUANTITY)
        if name in stack:  # recursive type: accept anything below this point
            return {}
        return _inline(definitions[name], definitions, (*stack, name))
    if schema.get("format") == "int-or-string":
        return dict(INT_OR_STRING)
    return {k: _inline(v, definitions, stack) for k, v in schema.items()}


def kubernetes_schemas(swagger: dict[str, Any]) -> dict[str, Any]:
    """Standalone strict schemas of KINDS, keyed by file name."""
    definitions = swagger["definitions"]
    out = {}
    for group, version, kind in KINDS:
        name = _definition_name(definitions, group, version, kind)
        schema = _inline(copy.deepcopy(definitions[name]), definitions, (name,))
        api_version = f"{group}/{version}" if group else version
        schema["properties"]["apiVersion"]["enum"] = [api_version]
        schema["properties"]["kind"]["enum"] = [kind]
        file = f"{kind.lower()}{kind_suffix(group, version)}.json"
        out[file] = _strict(_drop_descriptions(schema))
    return out


def _definition_name(definitions: dict[str, Any], group: str, version: str, kind: str) -> str:
    for name, schema in definitions.items():
        for gvk in schema.get("x-kubernetes-group-version-kind", []):
            if (gvk["group"], gvk["version"], gvk["kind"]) == (group, version, kind):
                return name
    raise KeyError(f"{group}/{version} {kind} is not in swagger.json")


def crd_schemas(crd_dir: Path) -> dict[str, Any]:
    """Strict schemas of every served version of every CRD in crd_dir, keyed by path."""
    out = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served", True):
                continue
            schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
            schema = _inline(schema, {})  # CRD schemas have no $refs; fixes int-or-string
            schema = _int_or_string_flags(schema)
            file = f"{group}/{kind.lower()}_{version['name']}.json"
            out[file] = _strict(_drop_descriptions(schema))
    return out


def _int_or_string_flags(schema: Any) -> Any:
    """CRDs mark int-or-string with a flag instead of a format."""
    if isinstance(schema, list):
        return [_int_or_string_flags(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    if schema.get("x-kubernetes-int-or-string"):
        return dict(INT_OR_STRING)
    return {k: _int_or_string_flags(v) for k, v in schema.items()}


def write(files: dict[str, Any], root: Path) -> None:
    """Write compact, key-sorted JSON so that regeneration gives byte-identical files."""
    for name, schema in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")


def main() -> None:
    k8s = module_dir("k8s.io/kubernetes", f"v{K8S_VERSION}")
    kuberay = module_dir("github.com/ray-project/kuberay/ray-operator", f"v{KUBERAY_VERSION}")
    swagger = json.loads((k8s / "api/openapi-spec/swagger.json").read_text())
    shutil.rmtree(OUT, ignore_errors=True)
    write(kubernetes_schemas(swagger), OUT / "kubernetes" / f"v{K8S_VERSION}-standalone-strict")
    write(crd_schemas(kuberay / "config/crd/bases"), OUT / "crds")
    (OUT / "SOURCE.md").write_text(_provenance())
    print(f"wrote {sum(1 for p in OUT.rglob('*.json'))} schemas under {OUT.name}/")


def _provenance() -> str:
    return f"""# Where these schemas come from

Generated by `scripts/gen_k8s_schemas.py`; do not edit by hand. Re-run it after changing
the pinned versions or the kinds that k8s/ uses.

- `kubernetes/v{K8S_VERSION}-standalone-strict/`: from `api/openapi-spec/swagger.json` of the
  Go module `k8s.io/kubernetes@v{K8S_VERSION}` (Go module proxy, checksum-verified): the
  kinds listed in the script, every `$ref` inlined, descriptions dropped, unknown fields
  rejected, IntOrString and Quantity accepting both of their JSON forms.
- `crds/`: from `config/crd/bases/*.yaml` of the Go module
  `github.com/ray-project/kuberay/ray-operator@v{KUBERAY_VERSION}`: each served version's
  `openAPIV3Schema`, descriptions dropped, unknown fields rejected unless the CRD says
  `x-kubernetes-preserve-unknown-fields`.

Both are Apache-2.0 licensed API definitions, kept here as data for offline validation.
"""


if __name__ == "__main__":
    main()
