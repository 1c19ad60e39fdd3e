"""The preflight gate on job files: refuses what will not fit or does not cover what it claims, before
anything is allocated; the CLI's exit codes and JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fjordtune.config import load_job
from fjordtune.errors import PreflightRefused

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "jobs" / "norskmistral-119b.yaml"
OFFLINE = ["model.path=builtin:mistral-small-4"]  # the real model's config, no S3 needed


@pytest.fixture(scope="module")
def real_counts():
    from fjordtune.preflight.gate import count

    return count(load_job(REAL, OFFLINE))


def test_builtin_mistral_small_4_has_the_released_dimensions():
    from fjordtune.model.load import builtin_config

    c = builtin_config("mistral-small-4")
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (131072, 4096, 36, 32)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (1024, 256, 64, 64, 128)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts, c.moe_intermediate_size) == (128, 4, 1, 2048)
    assert c.first_k_dense_replace == 0 and c.tie_word_embeddings is False


def test_builtin_preset_of_119b_is_never_built(tmp_path):
    from fjordtune.errors import UserError
    from fjordtune.model.load import save_builtin

    with pytest.raises(UserError, match="config for preflight"):
        save_builtin("mistral-small-4", tmp_path, seed=0)


PEFT_PATH = ["lora.expert_impl=peft", "train.forward_prefetch=implicit"]


@pytest.mark.parametrize("settings, workers, fits, needed", [
    ([], 4, False, 6), ([], 5, False, 6), ([], 6, True, 6),
    # peft's W+BA expert stacks and FSDP2's implicit prefetch: the story's 7 H100s
    (PEFT_PATH, 4, False, 7), (PEFT_PATH, 6, False, 7), (PEFT_PATH, 7, True, 7),
])
def test_shipped_job_fits_where_the_estimate_says(real_counts, settings, workers, fits, needed):
    from fjordtune.preflight.gate import check

    job = load_job(REAL, [*OFFLINE, *settings, f"resources.num_workers={workers}"])
    if fits:
        report = check(job, counts=real_counts)
        assert report.fits and report.device == "gpu" and report.min_gpus == needed
        assert report.estimate.total_bytes <= report.usable_bytes
    else:
        with pytest.raises(PreflightRefused) as err:
            check(job, counts=real_counts)
        text = "\n".join(err.value.lines)
        assert f"at {workers} GPUs" in text and f"fits at {needed} GPUs" in text
        assert "before any accelerator was allocated" in text
        assert not check(job, refuse=False, counts=real_counts).fits


def test_refusal_on_the_peft_path_names_the_grouped_implementation(real_counts):
    from fjordtune.preflight.gate import check

    job = load_job(REAL, [*OFFLINE, "lora.expert_impl=peft", "resources.num_workers=6"])
    with pytest.raises(PreflightRefused) as err:
        check(job, counts=real_counts)
    assert "set lora.expert_impl: grouped (" in "\n".join(err.value.lines)


def test_unmatched_lora_target_is_refused_with_the_names():
    from fjordtune.preflight.gate import check

    job = load_job(ROOT / "jobs" / "demo.yaml", ["lora.target_modules=[q_proj, k_proj, v_proj, o_proj]"])
    with pytest.raises(PreflightRefused) as err:
        check(job)
    assert "q_proj, k_proj, v_proj match nothing" in err.value.lines[0]


def test_demo_fits_on_cpu_workers():
    from fjordtune.preflight.gate import check

    report = check(load_job(ROOT / "jobs" / "demo.yaml"))
    assert report.fits and report.device == "cpu"
    assert "mlp.experts.gate_up_proj" in report.lora_coverage


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fjordtune", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_preflight_cli_exit_codes_and_json():
    ok = _cli("preflight", str(REAL), *sum((["--set", o] for o in OFFLINE), []), "--json")
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["fits"] and data["num_workers"] == 7 and data["per_worker_bytes"] < data["usable_bytes"]
    refused = _cli("preflight", str(REAL), "--set", OFFLINE[0], "--set", "resources.num_workers=5")
    assert refused.returncode == 2
    assert "REFUSED" in refused.stdout and "Traceback" not in refused.stderr
    assert data["min_gpus"] == 6
    placement = data["placement"]
    assert placement["fits"] and placement["problems"] == [] and placement["source"] == "resources.gpus_per_node"
    assert placement["train"] == {"num_workers": 7, "ranks_per_node": [7], "nodes_spanned": 1, "fits": True}
    assert placement["eval"]["actors_per_node"] == 2 and placement["eval"]["concurrent"] == 2


def test_refused_json_names_the_smallest_gpu_count_that_fits():
    """`--set resources.num_workers=4`: refused (exit 2), and the JSON says how many GPUs would do."""
    out = _cli("preflight", str(REAL), "--set", OFFLINE[0], "--set", "resources.num_workers=4", "--json")
    assert out.returncode == 2, out.stderr
    data = json.loads(out.stdout)
    assert not data["fits"] and data["num_workers"] == 4 and data["min_gpus"] == 6
    assert data["placement"]["fits"], "4 ranks fit one node: the refusal is memory, not placement"


def test_min_gpus_is_the_estimators_min_workers(real_counts):
    from fjordtune.preflight.gate import check

    for coverage in ([], ["lora.target_modules=[o_proj]", "lora.target_parameters=[]"]):
        job = load_job(REAL, [*OFFLINE, *coverage])
        report = check(job, refuse=False, counts=None if coverage else real_counts)
        assert report.min_gpus is not None and report.min_gpus <= 7
        assert report.as_dict()["min_gpus"] == report.min_gpus
    # CPU runs share one machine's memory: no GPU count to name
    assert check(load_job(ROOT / "jobs" / "demo.yaml")).min_gpus is None


def test_placement_refusal_makes_the_gate_refuse(real_counts):
    from fjordtune.preflight.gate import check

    # 4 GPUs per scoring actor hold the model; nodes of 2 GPUs cannot host one
    job = load_job(REAL, [*OFFLINE, "resources.gpus_per_node=2", "eval.gpus_per_worker=4"])
    with pytest.raises(PreflightRefused) as err:
        check(job, counts=real_counts)
    text = "\n".join(err.value.lines)
    assert "train: fits" in text and "eval: fits" in text
    assert "placement: REFUSED: eval: an actor needs 4 GPUs on one node, but nodes have 2" in text


def test_eval_that_cannot_hold_the_model_is_refused_before_training(real_counts):
    """Training fits at 7 GPUs, but a scoring actor holds the whole 119B model (222 GiB in bf16): with
    too few GPUs per actor the run would crash after hours of training. Refuse up front."""
    from fjordtune.preflight.gate import check

    ok = check(load_job(REAL, OFFLINE), counts=real_counts)
    assert ok.eval is not None and ok.eval.fits and ok.eval.gpus_per_worker == 4
    assert ok.eval.weights_bytes >= real_counts.total_params * 2
    job = load_job(REAL, [*OFFLINE, "eval.gpus_per_worker=2"])
    with pytest.raises(PreflightRefused) as err:
        check(job, counts=real_counts)
    text = "\n".join(err.value.lines)
    assert "train: fits" in text and "eval: REFUSED" in text and "eval.gpus_per_worker: 4" in text
    # no eval requested: nothing to hold
    assert check(load_job(REAL, [*OFFLINE, "eval.gpus_per_worker=2", "eval.models=[]"]), counts=real_counts).fits


@pytest.mark.parametrize(("memory_gib", "per_node", "workers", "expected"), [
    (79.6, 8, 7, (2, 4)),    # the story: H100s, one 8-GPU node: 2 replicas x 4 GPUs, all 8 busy
    (139.8, 8, 7, (4, 2)),   # H200s: the model fits on 2, so 4 replicas
    (79.6, 8, 9, (4, 4)),    # training spans 2 nodes: eval fills both
    (79.6, 6, 6, (1, 4)),    # 6-GPU nodes: one replica of 4 fits, 2 GPUs idle (and said so)
])
def test_auto_eval_plan_uses_the_fewest_gpus_that_hold_the_model_and_fills_the_nodes(
        real_counts, memory_gib, per_node, workers, expected):
    from fjordtune.preflight.gate import GiB, estimate_eval, plan_eval

    job = load_job(REAL, [*OFFLINE, "eval.num_workers=auto", "eval.gpus_per_worker=auto",
                          f"resources.accelerator_memory_gib={memory_gib}", f"resources.gpus_per_node={per_node}",
                          f"resources.num_workers={workers}"])
    cap = int(memory_gib * GiB)
    plan = plan_eval(job, real_counts, cap)
    assert (plan.replicas, plan.gpus_per_replica) == expected, plan.note
    # fewest: one GPU less would not hold it
    assert estimate_eval(job, real_counts, cap, gpus=plan.gpus_per_replica).fits
    assert not estimate_eval(job, real_counts, cap, gpus=plan.gpus_per_replica - 1).fits
    idle = -(-workers // per_node) * per_node - plan.replicas * plan.gpus_per_replica
    assert (f"{idle} idle" in plan.note) == (idle > 0), plan.note


def test_explicit_eval_sizes_are_kept_and_cpu_replicas_follow_the_training_workers(real_counts):
    from fjordtune.preflight.gate import plan_eval

    job = load_job(REAL, [*OFFLINE, "eval.num_workers=3", "eval.gpus_per_worker=8"])
    assert (plan_eval(job, real_counts).replicas, plan_eval(job, real_counts).gpus_per_replica) == (3, 8)
    cpu = load_job(ROOT / "jobs" / "demo.yaml")
    assert cpu.eval.num_workers == "auto"
    assert (plan_eval(cpu).replicas, plan_eval(cpu).gpus_per_replica) == (cpu.resources.num_workers, 0)
    with pytest.raises(Exception, match="eval.num_workers"):
        load_job(REAL, [*OFFLINE, "eval.num_workers=0"])


def test_a_model_no_node_can_hold_is_refused_naming_the_node_size(real_counts):
    from fjordtune.preflight.gate import check

    job = load_job(REAL, [*OFFLINE, "resources.gpus_per_node=2", "resources.num_workers=2"])
    with pytest.raises(PreflightRefused) as err:
        check(job, counts=real_counts)
    text = "\n".join(err.value.lines)
    assert "eval: REFUSED" in text and "more than a node's 2" in text, text
