"""The whole pipeline on real parts: a local Ray cluster, SeaweedFS as S3, FSDP2 over gloo with two
workers, lm-eval through Ray Data, the report. Then resume. (The `ray job submit` path: test_submit_e2e.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import fjordtune

pytestmark = pytest.mark.integration

ROOT = Path(fjordtune.__file__).resolve().parents[2]
DEMO = ROOT / "jobs" / "demo.yaml"
TASKS = "[nrk_quiz_qa_nob_p0, noropenbookqa_nno_p*, nortruthfulqa_mc_nob_p1]"


def small(name: str, *extra: str) -> list[str]:
    return [f"name={name}", "storage.uri=s3://fjt-e2e/runs", "train.max_steps=4", "train.checkpoint_every_steps=2",
            f"eval.tasks={TASKS}", "eval.num_workers=1", *extra]


@pytest.fixture(scope="module")
def ray_s3(s3_server, tmp_path_factory):
    """A local Ray cluster whose workers see the S3 server (they inherit this process's environment)."""
    import ray

    saved = dict(os.environ)
    os.environ.update(s3_server.env, FJORDTUNE_CACHE=str(tmp_path_factory.mktemp("cache")), RAY_AUTH_MODE="disabled")
    from fjordtune.storage import Store

    Store().ensure_bucket("s3://fjt-e2e")  # jobs never create buckets
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    yield s3_server
    ray.shutdown()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def full_run(ray_s3, tmp_path_factory):
    from fjordtune import pipeline
    from fjordtune.config import load_job

    out = tmp_path_factory.mktemp("run")
    job = load_job(DEMO, small("e2e"))
    return job, out, pipeline.run(job, output_dir=out)


def test_run_writes_report_results_and_png(full_run):
    from fjordtune.eval.run import expand_tasks, task_manager

    job, out, paths = full_run
    expected = expand_tasks(job.eval.tasks, known=list(task_manager().all_tasks))
    assert len(expected) == 7
    for label in ("base", "tuned"):
        res = json.loads((out / label / "results.json").read_text())
        assert sorted(res["tasks"]) == sorted(expected)
        for name, entry in res["tasks"].items():
            assert entry["n"] == 6 and 0 <= entry["acc"] <= 1 and 0 < entry["chance"] < 1
            assert ("acc_norm" in entry) == ("truthfulqa" not in name)
    md = (out / "report.md").read_text()
    assert "| NRK-Quiz-QA | nob |" in md and "| NorOpenBookQA | nno |" in md and "**average**" in md
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the training data's record: the contamination check's result and the mixture's manifest
    assert "## Training data" in md and "**clean**: no training row contains a NorEval item" in md, md
    record = json.loads((out / "run.json").read_text())["data"]
    assert record["contamination"]["checked"] and record["contamination"]["hits"] == 0
    assert record["manifest"]["rows"] == 60 and len(record["manifest"]["content_sha256"]) == 64
    from fjordtune.storage import Store

    stored = json.loads(Store().read_file(f"{job.run_uri}/data", "manifest.json"))
    assert stored == record["manifest"]


def test_run_summarises_telemetry_per_worker_and_replica(full_run):
    """No GPU here and no fake NVML asked for: the summary says utilisation is missing, and still has every
    process's own peak memory against preflight's prediction (test_submit_e2e.py has the GPU figures)."""
    job, out, _ = full_run
    train = json.loads((out / "run.json").read_text())["telemetry"]
    assert train["role"] == "train" and "no GPU telemetry" in train["note"]
    assert [p["rank"] for p in train["processes"]] == ["0", "1"]
    for p in train["processes"]:
        assert p["gpus"] == [] and p["interval_s"] == job.telemetry.interval_s
        assert 50 << 20 < p["process_peak_bytes"] < 8 << 30
        assert p["predicted_peak_bytes"] == json.loads((out / "run.json").read_text())["predicted_peak_bytes"]
    for label in ("base", "tuned"):
        res = json.loads((out / label / "results.json").read_text())
        (replica,) = res["telemetry"]["processes"]
        assert replica["role"] == "eval" and replica["rank"] == "0"
        assert replica["items_done"] == res["num_scored"] > 0
    md = (out / "report.md").read_text()
    assert "## GPU telemetry" in md and "### Training workers" in md and "### Eval replicas (tuned)" in md


def test_adapter_in_bucket_is_peft_format_and_loads(full_run, tmp_path):
    from peft import PeftModel

    from fjordtune.model.load import load_causal_lm
    from fjordtune.storage import Store

    job, _, _ = full_run
    store = Store()
    adapter = store.download_dir(f"{job.run_uri}/adapter", tmp_path / "adapter")
    base = store.download_dir(f"{job.run_uri}/base-model", tmp_path / "base")
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # the data it learnt from travels with it: the manifest (content hash) and the contamination check
    record = json.loads((adapter / "training_data.json").read_text())
    assert record["manifest"]["content_sha256"] == json.loads(store.read_file(f"{job.run_uri}/data",
                                                                              "manifest.json"))["content_sha256"]
    assert record["contamination"]["checked"] and record["contamination"]["hits"] == 0
    model = PeftModel.from_pretrained(load_causal_lm(str(base), dtype="float32"), str(adapter))
    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert any(".mlp.experts." in n for n in names) and any("kv_a_proj_with_mqa" in n for n in names)


def test_checkpoints_are_committed_and_pruned(full_run):
    """Checkpoints are fjordtune commits under <run>/checkpoints/step-N: the last
    `num_checkpoints_to_keep` are kept, each with every rank's DCP shard and the progress file."""
    from fjordtune.storage import Store
    from fjordtune.storage import checkpoints as ckpts

    job, _, _ = full_run
    store = Store()
    infos = ckpts.list_checkpoints(store, ckpts.checkpoints_uri(job.run_uri))
    assert [i.step for i in infos] == [2, 4][-job.train.num_checkpoints_to_keep:], infos
    assert all(i.committed and not i.leftovers for i in infos)
    latest = infos[-1]
    files = store.list_files(latest.uri)
    assert ".metadata" in files and "progress.json" in files  # DCP metadata from rank 0
    assert sum(name.endswith(".distcp") for name in files) == job.resources.num_workers  # one shard per rank
    assert json.loads(store.read_file(latest.uri, "progress.json"))["step"] == 4
    assert latest.pointer.meta["step"] == 4 and isinstance(latest.pointer.meta["loss"], float)


def test_training_resumes_where_it_stopped(ray_s3, tmp_path):
    """Train 2 steps, then ask for 4 under the same name: the second run resumes from step 2 and ends
    with the same adapter as an uninterrupted 4-step run. (A constant lr: a decaying schedule spans the
    run's steps, so 2 and 4 steps are different schedules; a resume on the same schedule is
    test_train_recipe.py's and test_train_faults.py's.)"""
    import torch
    from safetensors.torch import load_file

    from fjordtune import pipeline
    from fjordtune.config import load_job
    from fjordtune.storage import Store

    const = ("train.lr_schedule=constant", "train.warmup_steps=0")
    first = pipeline.train(load_job(DEMO, small("resume", "train.max_steps=2", *const)))
    assert first["num_steps"] == 2
    resumed = pipeline.train(load_job(DEMO, small("resume", *const)))
    straight = pipeline.train(load_job(DEMO, small("straight", *const)))
    assert resumed["num_steps"] == straight["num_steps"] == 4
    store = Store()
    a = load_file(str(store.local_view(resumed["adapter_uri"], os.environ["FJORDTUNE_CACHE"]) / "adapter_model.safetensors"))
    b = load_file(str(store.local_view(straight["adapter_uri"], os.environ["FJORDTUNE_CACHE"]) / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)
    # a finished run submitted again trains nothing more, keeps its adapter, and never reads the base
    # weights: its checkpoint is read first (a fresh node cache stays without the model)
    fresh_cache = tmp_path / "fresh-cache"
    again = pipeline.train(load_job(DEMO, small("resume", f"storage.cache_dir={fresh_cache}", *const)))
    assert again["num_steps"] == 4
    assert not list(fresh_cache.rglob("base-model")), sorted(fresh_cache.rglob("*"))[:10]
    c = load_file(str(store.local_view(again["adapter_uri"], os.environ["FJORDTUNE_CACHE"]) / "adapter_model.safetensors"))
    assert max((a[k] - c[k]).abs().max().item() for k in a) == 0


def test_bad_training_data_fails_before_any_worker_starts(ray_s3, tmp_path):
    from fjordtune import pipeline
    from fjordtune.config import load_job
    from fjordtune.errors import UserError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hei"}]}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: no assistant turn"):
        pipeline.train(load_job(DEMO, small("bad", f"data.train_files=[{bad}]")))



def test_eval_cli_writes_results_json_equal_to_the_pipelines(full_run, tmp_path):
    """`fjordtune eval JOB --output-dir DIR --adapter URI` as a user runs it: DIR/results.json has a
    `tasks` object keyed by lm-eval task name with acc, acc_norm where defined, and n; and it scores
    the tuned model exactly as the pipeline did."""
    import subprocess
    import sys

    job, out, _ = full_run
    cmd = [sys.executable, "-m", "fjordtune", "eval", str(DEMO), "--output-dir", str(tmp_path),
           "--adapter", f"{job.run_uri}/adapter"]
    for o in small("e2e"):
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "results.json").read_text())
    want = json.loads((out / "tuned" / "results.json").read_text())
    assert got["model"] == "tuned" and got["tasks"].keys() == want["tasks"].keys()
    for name, entry in got["tasks"].items():
        assert {"acc", "n"} <= entry.keys()
        for metric in ("acc", "acc_norm", "n"):
            assert entry.get(metric) == want["tasks"][name].get(metric), (name, metric)


def test_a_second_run_reuses_the_base_models_stored_results(full_run, tmp_path):
    """Base results are stored by model commit (and the requests, which encode tasks, shots and template):
    `run` again and the base model is not scored again; change the shots and it is."""
    from fjordtune import pipeline
    from fjordtune.config import load_job

    job, out, _ = full_run
    pipeline.run(job, output_dir=tmp_path / "again")
    first = json.loads((out / "base" / "results.json").read_text())
    second = json.loads((tmp_path / "again" / "base" / "results.json").read_text())
    assert first["num_scored"] == first["num_requests"] > 0 and first["num_reused"] == 0
    assert (second["num_scored"], second["num_reused"]) == (0, first["num_requests"])
    assert second["results_uri"] == first["results_uri"] and second["results_uri"].startswith(job.storage.uri)
    for name, entry in first["tasks"].items():
        assert {m: second["tasks"][name].get(m) for m in ("acc", "acc_norm")} == \
            {m: entry.get(m) for m in ("acc", "acc_norm")}
    other_shots = pipeline.evaluate(load_job(DEMO, small("e2e", "eval.num_fewshot=1")), output_dir=tmp_path / "1-shot",
                                    label="base")
    assert other_shots["num_scored"] > 0


def test_a_bad_fewshot_pattern_fails_before_training(ray_s3, tmp_path):
    from fjordtune import pipeline
    from fjordtune.config import load_job
    from fjordtune.errors import UserError

    job = load_job(DEMO, small("badshots", "eval.num_fewshot={nrk_quiz_qa_nbo_*: 2}"))
    with pytest.raises(UserError, match=r"eval.num_fewshot.nrk_quiz_qa_nbo_\*"):
        pipeline.run(job, output_dir=tmp_path)
    from fjordtune.storage import Store

    assert not Store().list_objects(f"{job.run_uri}"), "nothing may be written before the check"
