"""Where the job's processes go: training ranks and eval actors against the shapes of the nodes.

Pure functions of numbers (no Ray, no torch), like `estimate.py`, plus `read_cluster_file`, which
turns a KubeRay RayCluster / RayJob manifest or a Ray cluster-launcher YAML into those numbers.

- A training rank needs 1 GPU (on GPU runs) and `resources.cpus_per_worker` CPUs. Ray Train packs
  the ranks onto as few nodes as it can, so ranks fill the largest nodes first. FSDP2 ranks on
  several nodes all-gather and reduce-scatter over the network instead of NVLink: a warning.
- An eval actor needs `eval.gpus_per_worker` GPUs and the same CPUs on ONE node: it holds the whole
  model with device_map="auto", and Ray cannot split an actor across nodes. An actor larger than
  every node is refused (Ray Data would wait for it forever); fewer actors at once than
  `eval.num_workers` is a warning (the scorer then starts as many as fit).
- Training and eval run one after the other (the training workers are released first), so each is
  placed on the whole cluster on its own.

A "node" is one Ray node: a machine for the cluster launcher, a pod for KubeRay.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

GiB = 1 << 30
COMMON_NODE_GPUS = 8
"""GPUs of the largest common node (8x H100/H200/B200): up to this many ranks fit on one."""


@dataclass(frozen=True, kw_only=True)
class NodeGroup:
    """Identical nodes: `num_nodes` of them (None: as many as needed) with `gpus` GPUs and `cpus` CPUs
    (None: not known, not checked) each. Memory, /dev/shm and scratch are what a cluster file gives."""

    name: str
    gpus: int
    cpus: float | None = None
    num_nodes: int | None = None
    unit: str = "node"
    memory_bytes: int | None = None
    shm_bytes: int | None = None
    scratch_bytes: int | None = None
    """The volume that holds the node-local model cache (FJORDTUNE_CACHE)."""
    cache_dir: str | None = None

    def slots(self, *, gpus: int, cpus: float) -> int | None:
        """How many processes needing `gpus` GPUs and `cpus` CPUs one node holds (None: no limit)."""
        limits = []
        if gpus > 0:
            limits.append(self.gpus // gpus)
        if cpus > 0 and self.cpus is not None:
            limits.append(int(self.cpus // cpus))
        return min(limits) if limits else None

    def describe(self) -> str:
        if self.gpus == 0 and self.cpus is None:
            return self.name
        count = "" if self.num_nodes is None else f"{self.num_nodes} {self.unit}(s) x "
        cpus = "" if self.cpus is None else f", {self.cpus:g} CPUs"
        return f"{self.name}: {count}{self.gpus} GPU{'s' if self.gpus != 1 else ''}{cpus} per {self.unit}"


@dataclass(frozen=True, kw_only=True)
class ClusterShape:
    source: str
    """What the shape came from: "resources.gpus_per_node" or a cluster file's path."""
    groups: tuple[NodeGroup, ...]

    def describe(self) -> str:
        return "; ".join(g.describe() for g in self.groups) or f"{self.source}: no nodes"


def shape_from_gpus_per_node(gpus_per_node: int, *, use_gpu: bool = True) -> ClusterShape:
    """Nodes of `gpus_per_node` GPUs, as many as the job needs (no cluster file given). A CPU run (the
    demo, the tests) runs its workers on one machine, whose CPUs preflight does not count."""
    if not use_gpu:
        return ClusterShape(source="this machine", groups=(NodeGroup(name="CPU run on this machine", gpus=0),))
    return ClusterShape(source="resources.gpus_per_node",
                        groups=(NodeGroup(name="resources.gpus_per_node", gpus=gpus_per_node),))


@dataclass(frozen=True, kw_only=True)
class TrainPlacement:
    num_workers: int
    gpus_per_rank: int
    cpus_per_rank: float
    ranks_per_node: tuple[int, ...]
    """Ranks on each node used, fullest first, e.g. (7,) or (1, 1, 1, 1, 1, 1, 1)."""

    @property
    def nodes_spanned(self) -> int:
        return len(self.ranks_per_node)

    @property
    def fits(self) -> bool:
        return sum(self.ranks_per_node) >= self.num_workers


@dataclass(frozen=True, kw_only=True)
class EvalPlacement:
    num_actors: int
    gpus_per_actor: int
    cpus_per_actor: float
    actors_per_node: int | None
    """On the node that holds the most (None: no limit)."""
    concurrent: int
    """Actors that fit on the cluster at once (at most `num_actors`)."""

    @property
    def fits(self) -> bool:
        return self.concurrent > 0


@dataclass(frozen=True, kw_only=True)
class Placement:
    shape: ClusterShape
    train: TrainPlacement
    eval: EvalPlacement | None
    problems: tuple[str, ...] = ()
    """Why the job cannot be placed (preflight refuses)."""
    warnings: tuple[str, ...] = ()
    eval_nodes_assumed: int | None = None
    """Without a cluster file: the nodes eval may use (those the training ranks fill)."""

    @property
    def fits(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        t = self.train
        need = f"{t.gpus_per_rank} GPU, " if t.gpus_per_rank else ""
        per_node = ", ".join(map(str, t.ranks_per_node)) or "none"
        out = [f"placement: nodes: {self.shape.describe()}",
               f"placement: train: {t.num_workers} rank(s) of {need}{t.cpus_per_rank:g} CPUs: {t.nodes_spanned} "
               f"node(s) ({per_node} ranks)"]
        if self.eval is not None:
            e = self.eval
            need = f"{e.gpus_per_actor} GPUs, " if e.gpus_per_actor else ""
            per_node = "any number" if e.actors_per_node is None else str(e.actors_per_node)
            assumed = ("" if self.eval_nodes_assumed is None
                       else f" on the {self.eval_nodes_assumed} node(s) the training fills")
            out.append(f"placement: eval: {e.num_actors} actor(s) of {need}{e.cpus_per_actor:g} CPUs: {per_node} "
                       f"per node, {e.concurrent} at once{assumed}")
        out += [f"placement: WARNING: {w}" for w in self.warnings]
        out += [f"placement: REFUSED: {p}" for p in self.problems]
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "source": self.shape.source,
            "nodes": [{"name": g.name, "num_nodes": g.num_nodes, "gpus": g.gpus, "cpus": g.cpus}
                      for g in self.shape.groups],
            "train": {
                "num_workers": self.train.num_workers, "ranks_per_node": list(self.train.ranks_per_node),
                "nodes_spanned": self.train.nodes_spanned, "fits": self.train.fits,
            },
            "eval": None if self.eval is None else {
                "num_workers": self.eval.num_actors, "gpus_per_worker": self.eval.gpus_per_actor,
                "actors_per_node": self.eval.actors_per_node, "concurrent": self.eval.concurrent,
                "fits": self.eval.fits,
            },
            "problems": list(self.problems),
            "warnings": list(self.warnings),
        }


def _nodes_by_size(shape: ClusterShape, *, gpus: int, cpus: float) -> list[tuple[int | None, int | None]]:
    """(slots per node, number of such nodes) for every group that holds at least one, largest first."""
    pairs = [(g.slots(gpus=gpus, cpus=cpus), g.num_nodes) for g in shape.groups]
    pairs = [(s, n) for s, n in pairs if (s is None or s > 0) and (n is None or n > 0)]
    return sorted(pairs, key=lambda p: -math.inf if p[0] is None else -p[0])


def place_training(shape: ClusterShape, *, num_workers: int, gpus_per_rank: int, cpus_per_rank: float) -> TrainPlacement:
    """Fill the largest nodes first, as Ray Train's PACK placement does."""
    left, used = num_workers, []
    for slots, count in _nodes_by_size(shape, gpus=gpus_per_rank, cpus=cpus_per_rank):
        while left > 0 and (count is None or count > 0):
            take = left if slots is None else min(slots, left)
            used.append(take)
            left -= take
            count = None if count is None else count - 1
    return TrainPlacement(num_workers=num_workers, gpus_per_rank=gpus_per_rank, cpus_per_rank=cpus_per_rank,
                          ranks_per_node=tuple(used))


def place_eval(shape: ClusterShape, *, num_actors: int, gpus_per_actor: int, cpus_per_actor: float) -> EvalPlacement:
    nodes = _nodes_by_size(shape, gpus=gpus_per_actor, cpus=cpus_per_actor)
    total = 0
    for slots, count in nodes:
        if slots is None or count is None:
            total = num_actors
            break
        total += slots * count
    return EvalPlacement(num_actors=num_actors, gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor,
                         actors_per_node=nodes[0][0] if nodes else 0, concurrent=min(total, num_actors))


def _present(shape: ClusterShape) -> list[NodeGroup]:
    return [g for g in shape.groups if g.num_nodes is None or g.num_nodes > 0]


def check_placement(shape: ClusterShape, *, num_workers: int, use_gpu: bool, cpus_per_worker: float,
                    eval_actors: int | None = None, gpus_per_eval_actor: int = 1) -> Placement:
    """Place the training ranks, then (separately) `eval_actors` eval actors, on `shape`.

    Without a cluster file (`shape` has unbounded groups) eval is assumed to run on the nodes the
    training ranks fill, so the number of eval actors at once is counted on those.
    """
    problems: list[str] = []
    warnings: list[str] = []
    gpus = 1 if use_gpu else 0
    train = place_training(shape, num_workers=num_workers, gpus_per_rank=gpus, cpus_per_rank=cpus_per_worker)
    need = f"{gpus} GPU and {cpus_per_worker:g} CPUs" if use_gpu else f"{cpus_per_worker:g} CPUs"
    if not train.fits:
        problems.append(
            f"train: {num_workers} ranks need {need} each, but {shape.source} holds {sum(train.ranks_per_node)} at "
            f"once ({shape.describe()}); add nodes or GPUs, or lower resources.num_workers (min_gpus is the "
            "least that fits in memory)")
    elif train.nodes_spanned > 1:
        fix = (f"nodes (pods) with >= {num_workers} GPUs keep them on NVLink"
               if use_gpu and num_workers <= COMMON_NODE_GPUS
               else "a fast interconnect (EFA/InfiniBand) between the nodes matters")
        warnings.append(
            f"train: the {num_workers} FSDP2 ranks span {train.nodes_spanned} nodes "
            f"({', '.join(map(str, train.ranks_per_node))} per node): every all-gather and reduce-scatter crosses "
            f"the network between nodes instead of NVLink within one; {fix}")

    ev, assumed = None, None
    if eval_actors is not None:
        eval_gpus = gpus_per_eval_actor if use_gpu else 0
        eval_shape = shape
        if any(g.num_nodes is None for g in shape.groups):
            assumed = max(1, train.nodes_spanned)
            eval_shape = replace(shape, groups=tuple(
                g if g.num_nodes is not None else replace(g, num_nodes=assumed) for g in shape.groups))
        ev = place_eval(eval_shape, num_actors=eval_actors, gpus_per_actor=eval_gpus, cpus_per_actor=cpus_per_worker)
        if not ev.fits:
            problems.append(_eval_refusal(shape, gpus=eval_gpus, cpus=cpus_per_worker))
        elif ev.concurrent < eval_actors:
            where = (f"the {assumed} node(s) the training fills" if assumed is not None else shape.source)
            warnings.append(
                f"eval: {eval_actors} actors requested (eval.num_workers), {ev.concurrent} fit at once on {where} "
                f"({ev.actors_per_node} per node); eval runs with {ev.concurrent}, "
                f"{ev.concurrent / eval_actors:.0%} of the speed")
    return Placement(shape=shape, train=train, eval=ev, problems=tuple(problems), warnings=tuple(warnings),
                     eval_nodes_assumed=assumed)


def _eval_refusal(shape: ClusterShape, *, gpus: int, cpus: float) -> str:
    groups = _present(shape)
    if not groups:
        return f"eval: an actor needs {gpus} GPUs and {cpus:g} CPUs on one node, but {shape.source} has no nodes"
    big = max(groups, key=lambda g: (g.gpus, g.cpus or 0))
    if gpus > big.gpus:
        have = f"at most {big.gpus}" if len(groups) > 1 else str(big.gpus)
        return (f"eval: an actor needs {gpus} GPUs on one node, but nodes have {have} ({big.describe()}); a scoring "
                f"actor holds the whole model and Ray cannot split it across nodes: use nodes (pods) with >= {gpus} "
                "GPUs (resources.gpus_per_node, or the cluster file's GPUs per pod / node type), or fewer "
                "eval.gpus_per_worker if the model fits in them")
    best = max((g for g in groups if g.gpus >= gpus), key=lambda g: g.cpus or 0)
    need, where = ((f"{gpus} GPUs and {cpus:g} CPUs", f"the nodes with >= {gpus} GPUs have") if gpus
                   else (f"{cpus:g} CPUs", "nodes have"))
    return (f"eval: an actor needs {need} on one node, but {where} at most {best.cpus or 0:g} CPUs "
            f"({best.describe()}); lower resources.cpus_per_worker or give those nodes more CPUs")


# --------------------------------------------------------------------------------------------------
# cluster files

_BINARY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60}
_DECIMAL = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_QUANTITY = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([a-zA-Z]*)\s*$")


def k8s_quantity(value: Any) -> float:
    """A Kubernetes quantity as a number: 8 -> 8, "500m" -> 0.5, "200Gi" -> 200 * 2**30, "1e3" -> 1000."""
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, int | float):
        return float(value)
    m = _QUANTITY.match(str(value))
    if not m or (m[2] not in _BINARY and m[2] not in _DECIMAL):
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return float(m[1]) * (_BINARY.get(m[2]) or _DECIMAL[m[2]])


def docker_size(value: str) -> int:
    """A `docker run` size ("32g", "64gb", "1024m", "512k", "100") as bytes (docker's units are binary)."""
    m = re.match(r"^\s*'?(\d+(?:\.\d+)?)([bkmgt]?)b?'?\s*$", value.lower())
    if not m:
        raise ValueError(f"not a docker size: {value!r}")
    return int(float(m[1]) * 1024 ** "bkmgt".index(m[2] or "b"))


def read_cluster_file(path: str | Path) -> ClusterShape:
    """Node shapes of a KubeRay RayCluster / RayJob manifest or a Ray cluster-launcher YAML.

    Raises `UserError` (one line) for a file that is neither, or that cannot be read.
    """
    import yaml

    from fjordtune.errors import UserError

    try:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if isinstance(d, dict)]
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"--cluster {path}: cannot read it ({str(e).splitlines()[0]})") from None
    kuberay = next((d for d in docs if d.get("kind") in ("RayCluster", "RayJob")), None)
    launcher = next((d for d in docs if "available_node_types" in d), None)
    shape = None
    try:
        if kuberay is not None:
            spec = kuberay.get("spec") or {}
            shape = _kuberay_shape(str(path), spec if kuberay["kind"] == "RayCluster" else spec["rayClusterSpec"])
        elif launcher is not None:
            shape = _launcher_shape(str(path), launcher)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"--cluster {path}: cannot read its node shapes ({type(e).__name__}: {e})") from None
    if shape is not None:  # a node with neither GPUs nor CPUs (a head started with 0 and 0) holds nothing
        return replace(shape, groups=tuple(g for g in shape.groups if g.gpus > 0 or g.cpus != 0))
    kinds = sorted({str(d.get("kind")) for d in docs if "kind" in d}) or ["none"]
    raise UserError(f"--cluster {path}: not a KubeRay RayCluster or RayJob manifest nor a Ray cluster-launcher "
                    f"config (kind: {', '.join(kinds)}; no available_node_types)")


def _kuberay_group(name: str, group: dict[str, Any], *, num_nodes: int) -> NodeGroup:
    params = group.get("rayStartParams") or {}
    pod = (group.get("template") or {}).get("spec") or {}
    container = (pod.get("containers") or [{}])[0]  # KubeRay reads the Ray container: the first
    resources = container.get("resources") or {}
    limits = {**(resources.get("requests") or {}), **(resources.get("limits") or {})}
    if "num-gpus" in params:
        gpus = int(k8s_quantity(params["num-gpus"]))
    else:  # like KubeRay: any extended resource whose name ends in "gpu"
        gpus = int(sum(k8s_quantity(v) for k, v in limits.items() if k.endswith("gpu")))
    cpus: float | None = None
    if "num-cpus" in params:
        cpus = k8s_quantity(params["num-cpus"])
    elif "cpu" in limits:
        cpus = float(math.ceil(k8s_quantity(limits["cpu"])))
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    mounts = {m.get("mountPath", "").rstrip("/") or "/": volumes.get(m.get("name"), {})
              for m in container.get("volumeMounts") or []}
    env = {e.get("name"): e.get("value") for e in container.get("env") or [] if "value" in e}
    cache_dir = env.get("FJORDTUNE_CACHE")
    scratch = None
    if cache_dir:
        covering = [p for p in mounts if cache_dir == p or cache_dir.startswith(p.rstrip("/") + "/")]
        if covering:
            scratch = _volume_bytes(mounts[max(covering, key=len)])
    return NodeGroup(
        name=name, gpus=gpus, cpus=cpus, num_nodes=num_nodes, unit="pod",
        memory_bytes=int(k8s_quantity(limits["memory"])) if "memory" in limits else None,
        shm_bytes=_volume_bytes(mounts["/dev/shm"]) if "/dev/shm" in mounts else None,
        scratch_bytes=scratch, cache_dir=cache_dir,
    )


def _volume_bytes(volume: dict[str, Any]) -> int | None:
    if "emptyDir" in volume:
        size = (volume["emptyDir"] or {}).get("sizeLimit")
        return None if size is None else int(k8s_quantity(size))
    claim = ((volume.get("ephemeral") or {}).get("volumeClaimTemplate") or {}).get("spec") or {}
    size = ((claim.get("resources") or {}).get("requests") or {}).get("storage")
    return None if size is None else int(k8s_quantity(size))


def _kuberay_shape(source: str, spec: dict[str, Any]) -> ClusterShape:
    groups = []
    head = spec.get("headGroupSpec") or {}
    if str((head.get("rayStartParams") or {}).get("num-gpus", "")).strip() not in ("0", "0.0"):
        groups.append(_kuberay_group(f"{source} head", head, num_nodes=1))
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    for group in spec.get("workerGroupSpecs") or []:
        if group.get("suspend"):
            continue
        count = group.get("replicas", group.get("minReplicas", 0))
        if autoscaling and group.get("maxReplicas") is not None:
            count = group["maxReplicas"]
        count = int(count) * int(group.get("numOfHosts", 1))
        groups.append(_kuberay_group(f"{source} worker group {group['groupName']}", group, num_nodes=count))
    return ClusterShape(source=source, groups=tuple(groups))


def _run_option(options: Iterable[str], flag: str) -> list[str]:
    """Values of `--flag=value` / `--flag value` in docker run options (each entry may hold several)."""
    tokens = [t for o in options for t in str(o).split()]
    out = []
    for n, t in enumerate(tokens):
        if t.startswith(flag + "="):
            out.append(t.split("=", 1)[1])
        elif t == flag and n + 1 < len(tokens):
            out.append(tokens[n + 1])
    return out


def _launcher_shape(source: str, config: dict[str, Any]) -> ClusterShape:
    docker = config.get("docker") or {}
    head_type = config.get("head_node_type")
    groups = []
    for name, node_type in (config.get("available_node_types") or {}).items():
        resources = node_type.get("resources") or {}
        is_head = name == head_type
        options = [*(docker.get("run_options") or []),
                   *(docker.get("head_run_options" if is_head else "worker_run_options") or [])]
        env = dict(e.split("=", 1) for e in _run_option(options, "--env") + _run_option(options, "-e") if "=" in e)
        shm = _run_option(options, "--shm-size")
        disks = ((node_type.get("node_config") or {}).get("BlockDeviceMappings") or [])
        disk = sum(int((d.get("Ebs") or {}).get("VolumeSize", 0)) for d in disks) * GiB or None  # AWS: GiB
        groups.append(NodeGroup(
            name=f"{source} node type {name}", gpus=int(resources.get("GPU", 0)),
            cpus=float(resources["CPU"]) if "CPU" in resources else None,
            num_nodes=1 if is_head else int(node_type.get("max_workers", config.get("max_workers", 0))),
            shm_bytes=docker_size(shm[-1]) if shm else None, scratch_bytes=disk,
            cache_dir=env.get("FJORDTUNE_CACHE"),
        ))
    return ClusterShape(source=source, groups=tuple(groups))

