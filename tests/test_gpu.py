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


def test_real_nvml_sampler_sees_this_gpu():
    from fjordtune.telemetry.gpu import open_sampler

    sampler = open_sampler()
    assert sampler is not None
    samples = sampler.sample()
    assert samples and all(s.memory_total_bytes > 0 and 0 <= s.utilization_pct <= 100 for s in samples)
    sampler.close()
