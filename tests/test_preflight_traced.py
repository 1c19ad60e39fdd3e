"""`fjordtune preflight --method traced`: the real setup path and training step at the real world size on
fake tensors, against the analytic estimate.

The 119B case takes about 75 s and under 1 GB of memory on a 2-core machine (no GPU): it is the only
place where the analytic estimator is checked against a trace of the full Mistral Small 4 from inside
this repository."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "norskmistral-119b.yaml"
DEMO = ROOT / "jobs" / "demo.yaml"


def _preflight(*args: str, timeout: int = 300) -> tuple[int, dict, str]:
    proc = subprocess.run([sys.executable, "-m", "fjordtune", "preflight", *args, "--json"],
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}, proc.stderr


@pytest.mark.integration  # slow, not a service: ~75 s of tracing
def test_traced_119b_agrees_with_analytic_and_reports_loading():
    code, report, err = _preflight(str(JOB), "--set", "model.path=builtin:mistral-small-4", "--method", "traced")
    assert code == 0, err[-2000:]
    traced = report["traced"]
    assert traced["num_workers"] == 7
    training, analytic = traced["training_peak_bytes"], traced["analytic_training_live_bytes"]
    assert abs(analytic - training) <= 0.10 * training, (analytic, training)
    # the loading phase: this rank's padded shards and adapters plus one chunk, seen by the tracker
    assert abs(traced["analytic_loading_bytes"] - traced["loading_peak_bytes"]) <= 0.02 * traced["loading_peak_bytes"]
    loading = report["loading"]
    assert loading["ranks_per_node"] == 7
    assert 32 * 2**30 < loading["device_bytes_per_rank"] < 40 * 2**30  # ~1/7 of 222 GiB, padded
    assert loading["host_bytes_per_node"] == 7 * loading["host_bytes_per_rank"]
    assert traced["seconds"] < 300


def test_traced_small_model_loading_equals_analytic():
    """At toy size, in bf16 on 2 ranks: the traced loading peak equals the analytic shards + staging."""
    code, report, err = _preflight(str(DEMO), "--set", "model.dtype=bfloat16", "--method", "traced")
    assert code == 0, err[-2000:]
    traced = report["traced"]
    assert traced["num_workers"] == 2
    assert abs(traced["analytic_loading_bytes"] - traced["loading_peak_bytes"]) <= 1024
    assert traced["training_peak_bytes"] > traced["loading_peak_bytes"]


def test_traced_refuses_what_it_cannot_trace():
    code, _, err = _preflight(str(DEMO), "--method", "traced")  # the demo loads float32
    assert code == 2 and "bfloat16" in err and "Traceback" not in err


def test_four_gpus_are_refused_with_min_gpus():
    """With grouped expert LoRA and explicit forward prefetch (the defaults) the story's coverage fits on 6
    H100s; with peft's W+BA stacks and FSDP2's implicit prefetch it needs the story's 7."""
    code, report, _ = _preflight(str(JOB), "--set", "model.path=builtin:mistral-small-4",
                                 "--set", "resources.num_workers=4")
    assert code == 2
    assert report["fits"] is False and report["min_gpus"] == 6
    assert report["loading"]["ranks_per_node"] == 4
    code, report, _ = _preflight(str(JOB), "--set", "model.path=builtin:mistral-small-4",
                                 "--set", "resources.num_workers=4", "--set", "lora.expert_impl=peft",
                                 "--set", "train.forward_prefetch=implicit")
    assert code == 2 and report["min_gpus"] == 7
