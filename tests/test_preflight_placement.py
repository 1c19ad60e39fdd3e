"""Placement of training ranks and eval actors on nodes: the pure functions, the cluster-file reader,
the preflight CLI that refuses an eval actor larger than a node, and the Ray Data scorer that fails
fast (never hangs) when its actors cannot be placed, on a real local Ray cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fjordtune.errors import InfraError, UserError
from fjordtune.preflight.placement import (
    ClusterShape,
    NodeGroup,
    check_placement,
    docker_size,
    k8s_quantity,
    place_eval,
    place_training,
    read_cluster_file,
    shape_from_gpus_per_node,
)

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "jobs" / "norskmistral-119b.yaml"
RAYCLUSTER = ROOT / "cluster" / "kuberay" / "raycluster.yaml"
OFFLINE = ["--set", "model.path=builtin:mistral-small-4"]


def _shape(*groups: tuple[int, int | None, float | None]) -> ClusterShape:
    """(GPUs, number of nodes, CPUs) per group."""
    return ClusterShape(source="test", groups=tuple(
        NodeGroup(name=f"g{i}", gpus=g, num_nodes=n, cpus=c) for i, (g, n, c) in enumerate(groups)))


# --------------------------------------------------------------------------------------------------
# pure functions


def test_ranks_fill_one_eight_gpu_node():
    placed = check_placement(shape_from_gpus_per_node(8), num_workers=7, use_gpu=True, cpus_per_worker=8,
                             eval_actors=2, gpus_per_eval_actor=4)
    assert placed.fits and not placed.warnings
    assert placed.train.ranks_per_node == (7,) and placed.train.nodes_spanned == 1
    # eval is counted on the nodes the training fills: one node of 8 GPUs holds two actors of 4
    assert placed.eval_nodes_assumed == 1 and placed.eval.actors_per_node == 2 and placed.eval.concurrent == 2


def test_single_gpu_pods_spread_the_ranks_and_cannot_hold_an_eval_actor():
    """The old KubeRay shape: 7 pods x 1 GPU. NCCL crosses the pod network; a 4-GPU actor never fits."""
    placed = check_placement(_shape((1, 7, 20)), num_workers=7, use_gpu=True, cpus_per_worker=8,
                             eval_actors=1, gpus_per_eval_actor=4)
    assert placed.train.fits and placed.train.ranks_per_node == (1,) * 7
    (warning,) = placed.warnings
    assert "span 7 nodes" in warning and "NVLink" in warning and ">= 7 GPUs" in warning
    (problem,) = placed.problems
    assert "an actor needs 4 GPUs on one node, but nodes have 1 (g0: 7 node(s) x 1 GPU, 20 CPUs per node)" in problem
    assert not placed.fits and placed.eval.concurrent == 0


def test_more_ranks_than_a_node_span_nodes_without_suggesting_bigger_ones():
    placed = check_placement(shape_from_gpus_per_node(8), num_workers=16, use_gpu=True, cpus_per_worker=1)
    assert placed.train.ranks_per_node == (8, 8)
    assert "span 2 nodes" in placed.warnings[0] and "interconnect" in placed.warnings[0]


def test_ranks_fill_the_largest_nodes_first_and_a_too_small_cluster_is_refused():
    assert place_training(_shape((2, 3, None), (4, 1, None)), num_workers=7, gpus_per_rank=1,
                          cpus_per_rank=1).ranks_per_node == (4, 2, 1)
    placed = check_placement(_shape((2, 2, None)), num_workers=7, use_gpu=True, cpus_per_worker=1)
    assert not placed.fits and placed.train.ranks_per_node == (2, 2)
    assert "7 ranks need 1 GPU and 1 CPUs each, but test holds 4 at once" in placed.problems[0]


def test_cpus_limit_ranks_and_actors_per_node():
    # 8 GPUs but 16 CPUs: 2 ranks of 8 CPUs per node
    assert place_training(_shape((8, 4, 16)), num_workers=7, gpus_per_rank=1,
                          cpus_per_rank=8).ranks_per_node == (2, 2, 2, 1)
    placed = check_placement(_shape((8, 1, 4)), num_workers=1, use_gpu=True, cpus_per_worker=8,
                             eval_actors=1, gpus_per_eval_actor=4)
    assert "needs 4 GPUs and 8 CPUs on one node, but the nodes with >= 4 GPUs have at most 4 CPUs" in placed.problems[-1]


def test_fewer_eval_actors_at_once_is_a_warning_and_none_is_a_refusal():
    placed = check_placement(_shape((8, 1, None)), num_workers=7, use_gpu=True, cpus_per_worker=1,
                             eval_actors=3, gpus_per_eval_actor=4)
    assert placed.fits and placed.eval.concurrent == 2
    assert "3 actors requested (eval.num_workers), 2 fit at once" in placed.warnings[0]
    assert place_eval(_shape((2, 4, None)), num_actors=1, gpus_per_actor=4, cpus_per_actor=1).concurrent == 0
    assert place_eval(_shape((4, 0, None)), num_actors=1, gpus_per_actor=4, cpus_per_actor=1).concurrent == 0


def test_cpu_runs_are_placed_by_cpus():
    placed = check_placement(_shape((0, 2, 4)), num_workers=1, use_gpu=False, cpus_per_worker=8, eval_actors=1)
    assert placed.train.ranks_per_node == () and "1 ranks need 8 CPUs each, but test holds 0" in placed.problems[0]
    assert "eval: an actor needs 8 CPUs on one node, but nodes have at most 4 CPUs" in placed.problems[1]


def test_cpu_runs_need_no_gpus():
    placed = check_placement(shape_from_gpus_per_node(8, use_gpu=False), num_workers=2, use_gpu=False,
                             cpus_per_worker=1, eval_actors=2)
    assert placed.fits and placed.train.ranks_per_node == (2,) and placed.eval.concurrent == 2


@pytest.mark.parametrize("value, expected", [
    (8, 8), ("8", 8), ("500m", 0.5), ("200Gi", 200 * 2**30), ("1.5Ti", 1.5 * 2**40), ("400G", 400e9), ("1e3", 1000),
])
def test_k8s_quantities(value, expected):
    assert k8s_quantity(value) == expected


@pytest.mark.parametrize("value", ["200 gigs", "", "Gi", True])
def test_k8s_quantity_rejects_garbage(value):
    with pytest.raises(ValueError):
        k8s_quantity(value)


def test_docker_sizes():
    assert docker_size("32g") == 32 * 2**30 and docker_size("64gb") == 64 * 2**30
    assert docker_size("1024m") == 2**30 and docker_size("100") == 100


# --------------------------------------------------------------------------------------------------
# cluster files


def _single_gpu_pods(tmp_path: Path, *, kind: str = "RayCluster") -> Path:
    """The shipped RayCluster turned back into 7 worker pods of 1 GPU each."""
    manifest = yaml.safe_load(RAYCLUSTER.read_text())
    group = manifest["spec"]["workerGroupSpecs"][0]
    group.update(groupName="h100", replicas=7, minReplicas=7, maxReplicas=7)
    resources = group["template"]["spec"]["containers"][0]["resources"]
    for part in ("requests", "limits"):
        resources[part].update({"nvidia.com/gpu": 1, "cpu": "20", "memory": "200Gi"})
    if kind == "RayJob":
        manifest = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "x"},
                    "spec": {"entrypoint": "true", "rayClusterSpec": manifest["spec"]}}
    path = tmp_path / f"single-gpu-{kind.lower()}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_manifest_gives_its_worker_groups(tmp_path, kind):
    path = _single_gpu_pods(tmp_path, kind=kind)
    shape = read_cluster_file(path)
    (group,) = shape.groups  # the head (num-gpus "0", num-cpus "0") holds nothing and is left out
    assert (group.gpus, group.num_nodes, group.cpus, group.unit) == (1, 7, 20, "pod")
    assert group.memory_bytes == 200 * 2**30 and group.cache_dir == "/mnt/scratch/fjordtune-cache"
    assert group.describe() == f"{path} worker group h100: 7 pod(s) x 1 GPU, 20 CPUs per pod"


def test_kuberay_ray_start_params_win_and_a_gpu_head_counts(tmp_path):
    manifest = yaml.safe_load(RAYCLUSTER.read_text())
    manifest["spec"]["headGroupSpec"]["rayStartParams"].update({"num-gpus": "2", "num-cpus": "4"})
    manifest["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = "4"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(manifest))
    head, worker = read_cluster_file(path).groups
    assert (head.gpus, head.cpus, head.num_nodes) == (2, 4, 1)
    assert worker.gpus == 4


def test_launcher_config_gives_its_node_types():
    shape = read_cluster_file(ROOT / "cluster" / "launcher" / "aws-7xh100.yaml")
    (p5,) = shape.groups  # the head advertises 0 CPUs and 0 GPUs
    assert (p5.gpus, p5.cpus, p5.num_nodes) == (8, 192, 1)
    assert p5.shm_bytes == 32 * 2**30 and p5.cache_dir == "/mnt/scratch/fjordtune-cache"


@pytest.mark.parametrize("text", [
    "apiVersion: v1\nkind: Secret\nmetadata: {name: x}\n",
    "name: demo\nmodel: {path: builtin:tiny-mistral4}\n",
    "a: [unclosed\n",
])
def test_unknown_cluster_files_are_one_line_user_errors(tmp_path, text):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        read_cluster_file(path)
    assert len(err.value.lines) == 1 and str(path) in err.value.lines[0]
    with pytest.raises(UserError):
        read_cluster_file(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------------------------------
# the CLI: an eval actor larger than a node is refused before submit, with the numbers


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fjordtune", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_preflight_refuses_an_eval_actor_larger_than_gpus_per_node():
    out = _cli("preflight", str(REAL), *OFFLINE, "--set", "resources.gpus_per_node=2",
                "--set", "eval.gpus_per_worker=4", "--json")
    assert out.returncode == 2, out.stderr
    data = json.loads(out.stdout)
    assert not data["fits"] and not data["placement"]["fits"]
    assert data["placement"]["eval"]["actors_per_node"] == 0
    assert data["placement"]["train"]["ranks_per_node"] == [2, 2, 2, 1]
    (problem,) = data["placement"]["problems"]
    assert "eval: an actor needs 4 GPUs on one node, but nodes have 2 (resources.gpus_per_node" in problem


def test_preflight_refuses_single_gpu_pods_of_a_cluster_file(tmp_path):
    path = _single_gpu_pods(tmp_path)
    out = _cli("preflight", str(REAL), *OFFLINE, "--cluster", str(path), "--json")
    assert out.returncode == 2, out.stderr
    placement = json.loads(out.stdout)["placement"]
    assert placement["source"] == str(path) and placement["train"]["nodes_spanned"] == 7
    assert ("eval: an actor needs 4 GPUs on one node, but nodes have 1 "
            f"({path} worker group h100: 7 pod(s) x 1 GPU, 20 CPUs per pod)") in placement["problems"][0]
    assert "span 7 nodes" in placement["warnings"][0]
    text = _cli("preflight", str(REAL), *OFFLINE, "--cluster", str(path))
    assert text.returncode == 2 and "placement: REFUSED: eval: an actor needs 4 GPUs" in text.stdout


def test_preflight_accepts_the_shipped_cluster_and_rejects_unknown_files(tmp_path):
    ok = _cli("preflight", str(REAL), *OFFLINE, "--cluster", str(RAYCLUSTER))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "placement: train: 7 rank(s) of 1 GPU, 8 CPUs: 1 node(s) (7 ranks)" in ok.stdout
    bad = tmp_path / "secret.yaml"
    bad.write_text("apiVersion: v1\nkind: Secret\n")
    out = _cli("preflight", str(REAL), *OFFLINE, "--cluster", str(bad))
    assert out.returncode == 2 and out.stderr.count("error:") == 1 and "kind: Secret" in out.stderr
    assert "Traceback" not in out.stderr


def test_submit_checks_the_cluster_file_before_contacting_any_server(tmp_path):
    path = _single_gpu_pods(tmp_path)
    out = _cli("submit", str(REAL), *OFFLINE, "--cluster", str(path), "--address", "http://127.0.0.1:9")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "eval: an actor needs 4 GPUs on one node, but nodes have 1" in out.stderr + out.stdout
    assert "submitted" not in out.stdout


# --------------------------------------------------------------------------------------------------
# the Ray Data scorer: never waits forever for an actor


def _lm(**kwargs):
    from fjordtune.eval.ray_lm import RayDataLM

    return RayDataLM(model_uri="unused", tokenizer=None, **kwargs)


def test_scorer_counts_the_actors_alive_nodes_hold():
    nodes = [{"Alive": True, "Resources": {"CPU": 96.0, "GPU": 8.0}},
             {"Alive": False, "Resources": {"CPU": 96.0, "GPU": 8.0}},
             {"Alive": True, "Resources": {"CPU": 8.0}}]
    assert _lm(num_workers=2, use_gpu=True, gpus_per_worker=4, cpus_per_worker=8).placeable_actors(nodes) == 2
    # only one fits at once: start one rather than wait for the second forever
    assert _lm(num_workers=3, use_gpu=True, gpus_per_worker=4, cpus_per_worker=48).placeable_actors(nodes) == 2
    assert _lm(num_workers=2, use_gpu=True, gpus_per_worker=8, cpus_per_worker=8).placeable_actors(nodes) == 1
    with pytest.raises(UserError, match=r"needs 16 GPU\(s\) and 8 CPU\(s\) on one node.*1 x \(8 CPUs, 0 GPUs\), "
                       r"1 x \(96 CPUs, 8 GPUs\)"):
        _lm(num_workers=1, use_gpu=True, gpus_per_worker=16, cpus_per_worker=8).placeable_actors(nodes)


@pytest.fixture(scope="module")
def ray_cpu_only():
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


_PAIRS = [("Hei", " du")]


@pytest.mark.integration
def test_gpu_actor_on_a_cluster_without_gpus_fails_at_once(ray_cpu_only, tiny_model_dir):
    from fjordtune.eval.ray_lm import RayDataLM
    from fjordtune.model.load import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    lm = RayDataLM(model_uri=str(tiny_model_dir), tokenizer=tok, num_workers=1, use_gpu=True, gpus_per_worker=1)
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        lm.score_pairs(_PAIRS)
    assert time.monotonic() - t0 < 30
    line = err.value.lines[0]
    assert "a scoring actor needs 1 GPU(s) and 1 CPU(s) on one node" in line and "(2 CPUs, 0 GPUs)" in line


@pytest.mark.integration
def test_actor_that_never_starts_times_out_with_an_infra_error(ray_cpu_only, tiny_model_dir):
    """The node could hold the actor, but another actor holds its CPUs: Ray Data would wait forever;
    with the bound it gives up after `actor_start_timeout_s` and says why."""
    from fjordtune.eval.ray_lm import RayDataLM
    from fjordtune.model.load import load_tokenizer

    ray = ray_cpu_only
    tok = load_tokenizer(str(tiny_model_dir))

    @ray.remote(num_cpus=2)
    class Hog:
        def ping(self) -> int:
            return 1

    hog = Hog.remote()
    ray.get(hog.ping.remote())
    try:
        lm = RayDataLM(model_uri=str(tiny_model_dir), tokenizer=tok, num_workers=1, cpus_per_worker=2,
                       actor_start_timeout_s=3)
        t0 = time.monotonic()
        with pytest.raises(InfraError) as err:
            lm.score_pairs(_PAIRS)
        assert time.monotonic() - t0 < 60
        assert "1 scoring actor(s) (2 CPU(s) each) did not start within 3 s" in err.value.lines[0]
        # the process-wide Ray Data setting is restored
        assert ray.data.DataContext.get_current().wait_for_min_actors_s != 3
    finally:
        ray.kill(hog)


def test_placement_dict_is_plain_json():
    placed = check_placement(_shape((1, 7, 20)), num_workers=7, use_gpu=True, cpus_per_worker=8,
                             eval_actors=1, gpus_per_eval_actor=4)
    data = json.loads(json.dumps(placed.as_dict()))
    assert data["fits"] is False and data["train"] == {"num_workers": 7, "ranks_per_node": [1] * 7,
                                                       "nodes_spanned": 7, "fits": True}
    assert data["eval"]["actors_per_node"] == 0 and len(data["problems"]) == len(data["warnings"]) == 1
    assert data["nodes"] == [{"name": "g0", "num_nodes": 7, "gpus": 1, "cpus": 20}]
