"""The orchestration layer: preflight gate -> stage base model -> train -> eval base and tuned -> report.

This is where the preflight gate lives (not inside `train`), so `preflight` may import `train`
helpers without a cycle. Each stage is an importable function the CLI wraps.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from fjordtune import stopping
from fjordtune.config.schema import JobSpec
from fjordtune.storage import Store

log = logging.getLogger(__name__)


def say(msg: str) -> None:
    """Progress for people watching a terminal or `ray job logs` (stage banners, results)."""
    print(msg, file=sys.stdout, flush=True)


def connect_ray(job: JobSpec) -> None:
    """Join the cluster this process runs in (RAY_ADDRESS under `ray job submit`), else start a local one."""
    import os

    import ray

    if ray.is_initialized():
        return
    # Never turns Ray's token auth off: joining a cluster uses RAY_AUTH_MODE and the token of the environment
    # (the cluster's own under `ray job submit`); only a private cluster started here picks its mode.
    address = os.environ.get("RAY_ADDRESS", "")
    if address.startswith(("http://", "https://")):
        # a job-server (dashboard) URL: right for `ray job submit`, not for joining the cluster
        log.warning("RAY_ADDRESS=%s is a dashboard URL; joining the Ray cluster on this node instead", address)
        ray.init(address="auto", logging_level=logging.WARNING)
    elif address:
        ray.init(logging_level=logging.WARNING)
    elif (running := _live_local_cluster()) is not None:  # e.g. `fjordtune train` on a head node
        log.info("joining the Ray cluster running on this node at %s", running)
        ray.init(address=running, logging_level=logging.WARNING)
    else:  # no cluster: a private local one for this process, with token auth unless RAY_AUTH_MODE says otherwise
        from fjordtune.devstack import token_auth_for_private_cluster

        token_auth_for_private_cluster()
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    ctx = ray.get_runtime_context()
    say(f"Ray: connected (node {ctx.get_node_id()[:8]}), resources {ray.cluster_resources()}")


def _live_local_cluster() -> str | None:
    """The GCS address of the Ray cluster this node last started, if it still answers. A plain `ray.init()`
    would also join one that died without `ray stop` (its address stays in /tmp/ray/ray_current_cluster)
    and retry it for minutes; a dead one is skipped here with a warning."""
    import socket

    path = Path(os.environ.get("RAY_TMPDIR", "/tmp/ray")) / "ray_current_cluster"
    try:
        address = path.read_text().strip()
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=2):
            return address
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        log.warning("%s names a Ray cluster that does not answer; starting a private local one", path)
        return None


def stage_model(job: JobSpec, store: Store) -> str:
    """Where workers load the base model from, checked complete (every shard present) before any starts."""
    from fjordtune.model.load import check_model_folder, stage_base_model

    store.check_bucket(job.storage.uri)  # a typo in the bucket name is an error, never a new bucket
    uri = stage_base_model(job.model.path, run_uri=job.run_uri, store=store, seed=job.model.seed)
    check_model_folder(uri, store=store)
    return uri


def preflight(job: JobSpec) -> Any:
    """Estimate per-worker memory; raise `PreflightRefused` if the job cannot fit."""
    from fjordtune.preflight.gate import check

    report = check(job)
    say(report.text)
    return report


def check_data(job: JobSpec) -> Any:
    """Plan the training mixture and check every row against NorEval, before any worker or GPU: bad rows and
    contaminated data stop the job here (`data.prepare.plan_job_data`). The manifest and the check's result
    are committed to `<run>/data/`."""
    from fjordtune.data.prepare import plan_job_data, save_data_record

    store = Store.for_job(job)
    say(f"== data: {len(job.data.source_list)} source(s), checked against NorEval")
    data = plan_job_data(job, store=store, say=say)
    save_data_record(job, data, store=store)
    return data


def train(job: JobSpec, *, predicted_peak_bytes: int | None = None, data: Any = None) -> dict[str, Any]:
    """Train on the connected Ray cluster. `predicted_peak_bytes`: preflight's per-worker estimate, logged by
    the workers next to the peaks they measure (so that the estimate can be checked and calibrated). `data`:
    what `check_data` returned (checked here when not given)."""
    from fjordtune.train.ray_driver import run_training

    store = Store.for_job(job)
    if data is None:
        data = check_data(job)
    model_uri = stage_model(job, store)
    connect_ray(job)
    say(f"== train: {job.resources.num_workers} workers, FSDP2, checkpoints in {job.run_uri}/checkpoints")
    outcome = run_training(job, model_uri=model_uri, predicted_peak_bytes=predicted_peak_bytes, data=data)
    meta = outcome.metrics
    held = ""
    if "eval_loss" in meta:
        held = f", held-out loss {meta.get('base_eval_loss', float('nan')):.4f} (base) -> {meta['eval_loss']:.4f}"
    say(f"== train done: {outcome.num_steps} steps, final loss {outcome.final_loss}{held}, adapter {outcome.adapter_uri}")
    info = {"model_uri": model_uri, "adapter_uri": outcome.adapter_uri, "num_steps": outcome.num_steps,
            "final_loss": outcome.final_loss}
    for key in ("base_eval_loss", "eval_loss", "peak_memory_bytes", "predicted_peak_bytes"):
        if key in meta:
            info[key] = meta[key]
    if outcome.data:
        info["data"] = outcome.data  # the mixture's manifest and the contamination check
    if outcome.telemetry:
        info["telemetry"] = outcome.telemetry  # per GPU: utilisation, memory against the prediction, warnings
    return info


def evaluate(job: JobSpec, *, output_dir: str | Path, adapter_uri: str | None = None,
             label: str | None = None) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    from fjordtune.eval.run import evaluate as run_eval
    from fjordtune.eval.run import prepare

    store = Store.for_job(job)
    model_uri = stage_model(job, store)
    label = label or ("tuned" if adapter_uri else "base")
    say(f"== eval {label}: {len(job.eval.tasks)} task pattern(s) on Ray Data scoring replicas")
    # lm-eval's tasks are built while Ray starts (a local Ray takes seconds, mostly waiting on its
    # processes). Not the other way round: Ray's processes die with the thread that started them
    with ThreadPoolExecutor(1, thread_name_prefix="fjordtune-prepare") as pool:
        prepared = pool.submit(prepare, job, model_uri=model_uri)
        connect_ray(job)
        ready = prepared.result()
    results = run_eval(job, model_uri=model_uri, adapter_uri=adapter_uri, label=label, output_dir=output_dir,
                       prepared=ready)
    reused = f" ({results['num_reused']} reused from {results['results_uri']})" if results.get("num_reused") else ""
    say(f"== eval {label} done: {len(results['tasks'])} tasks, {results['num_requests']} requests{reused} in "
        f"{results['seconds']} s -> {Path(output_dir) / 'results.json'}")
    return results


def report(job: JobSpec, *, output_dir: str | Path, base: dict[str, Any] | None, tuned: dict[str, Any] | None,
           train_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write report.md, scores.png and summary.json into `output_dir`, and commit them with each model's
    results.json (`base/`, `tuned/`, as in `output_dir`) to `<run_uri>/report/`, where `fjordtune submit`
    fetches them from."""
    from fjordtune.eval.run import write_results
    from fjordtune.report import write_report

    paths = write_report(output_dir=output_dir, base=base, tuned=tuned, train=train_info, title=f"fjordtune: {job.name}")
    store = Store.for_job(job)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("report.md", "scores.png", "summary.json"):
            Path(tmp, name).write_bytes(Path(output_dir, name).read_bytes())
        for label, results in (("base", base), ("tuned", tuned)):
            if results is not None:
                write_results(results, Path(tmp, label))
        store.upload_dir(tmp, f"{job.run_uri}/report")
    return paths


def run(job: JobSpec, *, output_dir: str | Path) -> dict[str, Any]:
    """The whole pipeline. Returns the report paths; everything is also committed to storage. SIGTERM
    (`ray job stop`) raises `stopping.StopRequested` once the training workers are aborted."""
    out = Path(output_dir)
    say(f"== fjordtune run {job.name}: storage {job.run_uri}, local output {out.resolve()}")
    store = Store.for_job(job)
    store.check_bucket(job.storage.uri)  # seconds, before the estimate and any GPU
    if job.eval.models:  # eval.tasks / eval.num_fewshot typos: now, not after training
        from fjordtune.eval.run import check_tasks

        say(f"== eval tasks: {len(check_tasks(job))} lm-eval tasks, checked")
    data = check_data(job)  # bad rows and NorEval items in the training data: refused before any worker
    estimate = preflight(job)
    connect_ray(job)  # before the stop handler: `ray.init` installs a SIGTERM handler of its own
    with stopping.stop_on_sigterm(run_uri=job.run_uri, store=store):  # `ray job stop`: see stopping.py
        with stopping.training():
            info = train(job, predicted_peak_bytes=estimate.estimate.total_bytes, data=data)
        base = tuned = None
        if "base" in job.eval.models:
            base = evaluate(job, output_dir=out / "base", label="base")
        if "tuned" in job.eval.models:
            tuned = evaluate(job, output_dir=out / "tuned", adapter_uri=info["adapter_uri"], label="tuned")
        paths = report(job, output_dir=out, base=base, tuned=tuned, train_info=info)
    say("")
    say(paths["table"])
    say("")
    say(paths["words"])
    say("")
    if paths.get("held_out"):
        say(paths["held_out"])
        say("")
    from fjordtune.telemetry.summary import headline

    lines = [headline(b, label=name) for name, b in (("train", info.get("telemetry")),
                                                     ("eval base", (base or {}).get("telemetry")),
                                                     ("eval tuned", (tuned or {}).get("telemetry"))) if b]
    if lines:
        say("\n".join(lines))
        say("")
    say(f"report: {paths['markdown'].resolve()}")
    say(f"chart:  {paths['png'].resolve()}")
    say(f"stored: {job.run_uri}/report/ (report, chart, summary, results.json of each model; "
        f"adapter: {info['adapter_uri']})")
    (out / "run.json").write_text(json.dumps({"job": job.name, **info}, indent=2) + "\n")
    return paths
