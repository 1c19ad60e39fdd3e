"""GPU checks of the Ray-free cores (trainer step, scorer, NVML sampler). Skipped without CUDA.

On a GPU machine: `scripts/gpu_check` (needs torch, transformers, peft, pytest and nvidia-ml-py; no
Ray, no lm-eval). Where pydantic is missing, fetch its wheels first with `scripts/gpu_check
--fetch-wheels` and bring the git-ignored `.whl/` folder along (the device tool: `carry: [".whl"]`).
Write what it measured into docs/gpu-results.md."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROOT = Path(__file__).resolve().parents[1]


def test_trainer_core_steps_on_cuda_in_bf16(tiny_model_dir):
    from fjordtune.config import load_job
    from fjordtune.data.sft import epoch_batches, read_rows
    from fjordtune.train.core import TrainerCore

    job = load_job(ROOT / "jobs" / "demo.yaml", ["model.dtype=bfloat16", "resources.use_gpu=true"])
    core = TrainerCore(job, model_dir=str(tiny_model_dir), device=torch.device("cuda"))
    rows = read_rows([str(ROOT / "src/fjordtune/samples/sft/demo.jsonl")])
    batches = epoch_batches(core.examples(rows), batch_size=4, rank=0, world_size=1, epoch=0, seed=0,
                            pad_id=core.tokenizer.pad_token_id)
    losses = [core.train_step(b).loss for b, _ in zip(batches, range(6))]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in core.model.parameters() if p.requires_grad)


def test_scorer_on_cuda_matches_cpu(tiny_model_dir):
    from fjordtune.eval.scorer import Scorer
    from fjordtune.model.load import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    ctx = [tok.encode("Hovudstaden i Noreg er"), tok.encode("Kva heiter den lengste elva?")]
    cont = [tok.encode(" Oslo", add_special_tokens=False), tok.encode(" Glomma", add_special_tokens=False)]
    cpu = Scorer(str(tiny_model_dir), dtype="float32", device="cpu").score(ctx, cont)
    gpu = Scorer(str(tiny_model_dir), dtype="float32", device="cuda").score(ctx, cont)
    assert max(abs(a[0] - b[0]) for a, b in zip(cpu, gpu)) < 1e-3


def _choices(tok) -> tuple[list[list[int]], list[list[int]]]:
    """Multiple-choice shaped: 3 questions, 4 choices each, one-token and multi-token answers."""
    questions = ["Hovudstaden i Noreg er", "Kva heiter den lengste elva i Noreg?", "Kven skreiv Peer Gynt?"]
    answers = [" Oslo", " Bergen", " Glomma", " Trondheim og Tromsø", " Ibsen", " Bjørnson", " Hamsun", " A"]
    ctxs, conts = [], []
    for i, q in enumerate(questions):
        for a in answers[i : i + 4]:
            ctxs.append(tok.encode(q))
            conts.append(tok.encode(a, add_special_tokens=False))
    return ctxs, conts


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-3), ("bfloat16", 0.1)])
def test_every_scoring_path_on_cuda_matches_full_scoring(tiny_model_dir, dtype, tol):
    """One forward per unit (4D mask), context + KV cache, and full scoring agree on the GPU (bf16 within
    its rounding), with the same greedy flags in fp32."""
    from fjordtune.eval.scorer import Scorer
    from fjordtune.model.load import load_tokenizer

    ctxs, conts = _choices(load_tokenizer(str(tiny_model_dir)))
    scorer = Scorer(str(tiny_model_dir), dtype=dtype, device="cuda")
    assert scorer.packed, scorer.attention
    full = scorer.score(ctxs, conts, shared_context=False)
    packed = scorer.score(ctxs, conts)
    scorer.packed = False
    kv = scorer.score(ctxs, conts)
    for got in (packed, kv):
        assert max(abs(a[0] - b[0]) for a, b in zip(got, full, strict=True)) < tol
        if dtype == "float32":
            assert [a[1] for a in got] == [b[1] for b in full]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="tensor parallel needs 2 GPUs")
def test_tensor_parallel_replica_over_two_gpus_scores_like_one(tiny_model_dir):
    """eval.placement tensor_parallel on GPUs: rank 0 here, rank 1 a child process on the second GPU (NCCL)."""
    from fjordtune.eval.scorer import Scorer
    from fjordtune.eval.tp import TPReplica, local_param_bytes
    from fjordtune.model.load import load_tokenizer

    ctxs, conts = _choices(load_tokenizer(str(tiny_model_dir)))
    one = Scorer(str(tiny_model_dir), dtype="float32", device="cuda").score(ctxs, conts)
    replica = TPReplica(str(tiny_model_dir), world=2, dtype="float32", device="cuda")
    try:
        two = replica.score(ctxs, conts)
        assert local_param_bytes(replica.scorer.model, contains=".mlp.experts.") > 0
    finally:
        replica.close()
    assert max(abs(a[0] - b[0]) for a, b in zip(one, two, strict=True)) < 1e-3
    assert [a[1] for a in one] == [b[1] for b in two]


def test_real_nvml_sampler_sees_this_gpu():
    from fjordtune.telemetry.gpu import open_sampler

    sampler = open_sampler()
    assert sampler is not None
    samples = sampler.sample()
    assert samples and all(s.memory_total_bytes > 0 and 0 <= s.utilization_pct <= 100 for s in samples)
    sampler.close()


def test_monitor_on_a_busy_gpu_sees_the_work_power_and_the_peak():
    """The per-rank monitor with real NVML, no Ray: busy matmuls in the working phase read as high
    utilisation, power and temperature are reported, the device name gives a peak for MFU, and the
    process peak is CUDA's own max_memory_allocated."""
    import time

    from fjordtune.telemetry.flops import peak_flops
    from fjordtune.telemetry.gpu import open_sampler
    from fjordtune.telemetry.monitor import Monitor

    dev = torch.device("cuda", 0)
    mon = Monitor(role="train", rank=0, run="gpu-check", sampler=open_sampler(), interval_s=0.2, export=False,
                  process_peak=lambda: torch.cuda.max_memory_allocated(dev)).start()
    mon.phase("train")
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    t_end = time.monotonic() + 4
    while time.monotonic() < t_end:
        for _ in range(20):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize(dev)
    s = mon.close()
    g = s["gpus"][0]
    print("monitor on GPU:", s["device"], {k: g[k] for k in ("utilization_mean_pct", "utilization_p5_pct",
                                                           "utilization_p95_pct", "power_mean_w",
                                                           "temperature_max_c", "samples")})
    assert g["samples"] >= 10 and g["utilization_mean_pct"] > 50, g
    assert g["power_mean_w"] and g["power_mean_w"] > 50 and g["temperature_max_c"] is not None
    assert peak_flops(s["device"]) is not None, s["device"]
    assert s["process_peak_bytes"] >= 8192 * 8192 * 2 and s["source"] == "nvml"
