"""The training core under real FSDP2 with two gloo processes (no Ray): same losses as one unsharded
process, a complete peft adapter, and an exact resume from a DCP checkpoint. The demo job's expert
adapters use the grouped implementation (`lora.expert_impl: grouped`, the default): the adapter it
trains must load in plain peft and give the same held-out loss."""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.integration

import fjordtune

ROOT = Path(fjordtune.__file__).resolve().parents[2]
JOB = ROOT / "jobs" / "demo.yaml"
SFT = ROOT / "src" / "fjordtune" / "samples" / "sft" / "demo.jsonl"
HELDOUT = ROOT / "src" / "fjordtune" / "samples" / "sft" / "demo-heldout.jsonl"
STEPS = 4


def _overrides(ac: bool) -> list[str]:
    return [f"train.activation_checkpointing={str(ac).lower()}", "train.micro_batch_size=2", "data.max_seq_len=96"]


def _batches(core, world: int, rank: int, *, micro: int) -> list[dict]:
    """The same global batches for any world size: each global step takes micro*2 rows, split by rank."""
    from fjordtune.data.sft import collate, read_rows

    rows = read_rows([str(SFT)])
    examples = core.examples(rows)
    per_step = 2 * micro
    out = []
    for s in range(STEPS):
        chunk = examples[s * per_step : (s + 1) * per_step]
        mine = chunk if world == 1 else chunk[rank * micro : (rank + 1) * micro]
        out.append(collate(mine, pad_id=core.tokenizer.pad_token_id))
    return out


def _heldout_batch(core) -> dict:
    from fjordtune.data.sft import collate, read_rows

    return collate(core.examples(read_rows([str(HELDOUT)]))[:4], pad_id=core.tokenizer.pad_token_id)


def _worker(rank: int, world: int, port: int, model_dir: str, out: str, ac: bool, resume_dir: str | None) -> None:
    import torch.distributed as dist

    from fjordtune.config import load_job
    from fjordtune.train.core import TrainerCore

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        job = load_job(JOB, _overrides(ac))
        core = TrainerCore(job, model_dir=model_dir, device=torch.device("cpu"))
        batches = _batches(core, world, rank, micro=2)
        losses = []
        start = 0
        if resume_dir:
            core.load_resumable(resume_dir)
            start = STEPS // 2
            core.step = start  # the lr schedule's position (the training loop restores it from progress.json)
        for i, b in enumerate(batches):
            if i < start:
                continue
            losses.append(core.train_step(b).loss)
            if i + 1 == STEPS // 2 and not resume_dir:
                core.save_resumable(Path(out) / "ckpt")
        held_out, _ = core.eval_loss([_heldout_batch(core)])  # every rank the same batch: the same mean
        core.save_adapter(Path(out) / "adapter")
        if rank == 0:
            (Path(out) / "losses.json").write_text(json.dumps(losses))
            (Path(out) / "eval.json").write_text(json.dumps({
                "loss": held_out, "impls": sorted({t.impl for t in core.coverage.targets if t.kind == "parameter"})}))
    finally:
        dist.destroy_process_group()


def _single(model_dir: str, ac: bool) -> list[float]:
    from fjordtune.config import load_job
    from fjordtune.train.core import TrainerCore

    core = TrainerCore(load_job(JOB, _overrides(ac)), model_dir=model_dir, device=torch.device("cpu"))
    return [core.train_step(b).loss for b in _batches(core, 1, 0, micro=2)]


def _spawn(model_dir: str, out: str, ac: bool, resume_dir: str | None = None) -> list[float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, model_dir, out, ac, resume_dir), nprocs=2, join=True)
    return json.loads((Path(out) / "losses.json").read_text())


@pytest.fixture(scope="module")
def sharded_run(tiny_model_dir):
    out = tempfile.mkdtemp(prefix="fjt-fsdp-")
    losses = _spawn(str(tiny_model_dir), out, ac=True)
    return out, losses


def test_two_gloo_ranks_match_one_process(tiny_model_dir, sharded_run):
    _, sharded = sharded_run
    single = _single(str(tiny_model_dir), ac=True)
    assert len(sharded) == STEPS
    assert max(abs(a - b) for a, b in zip(sharded, single)) < 1e-5, (sharded, single)
    assert sharded[-1] != sharded[0]  # it trained


def test_adapter_has_every_trainable_tensor_and_loads_in_peft(tiny_model_dir, sharded_run):
    """Activation checkpointing must not hide the expert adapters from peft's save (it did with
    checkpoint_wrapper: the saved file silently lacked every `experts.*lora_*` tensor)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from fjordtune.model.load import load_causal_lm

    out, _ = sharded_run
    saved = load_file(str(Path(out) / "adapter" / "adapter_model.safetensors"))
    assert any(".mlp.experts." in k for k in saved), sorted(saved)[:5]
    assert any(".self_attn.kv_b_proj." in k for k in saved)
    base = load_causal_lm(str(tiny_model_dir), dtype="float32")
    model = PeftModel.from_pretrained(base, str(Path(out) / "adapter"))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved)
    nonzero_b = [k for k, v in saved.items() if "lora_B" in k and v.abs().sum() > 0]
    assert nonzero_b, "lora_B is still all zeros: the adapter never trained"


def test_grouped_adapter_loads_in_peft_and_reproduces_the_held_out_loss(tiny_model_dir, sharded_run):
    """Trained with grouped expert LoRA under FSDP2; evaluated by peft's own implementation (W+BA)."""
    from peft import PeftModel

    from fjordtune.config import load_job
    from fjordtune.model.load import load_causal_lm
    from fjordtune.train.core import TrainerCore

    out, _ = sharded_run
    trained = json.loads((Path(out) / "eval.json").read_text())
    assert trained["impls"] == ["grouped"]
    core = TrainerCore(load_job(JOB, _overrides(True)), model_dir=str(tiny_model_dir), device=torch.device("cpu"),
                       load_base=False)  # tokenizer and examples only
    batch = _heldout_batch(core)
    model = PeftModel.from_pretrained(load_causal_lm(str(tiny_model_dir), dtype="float32"), str(Path(out) / "adapter"))
    assert "GroupedExpertLoRA" not in {type(m).__name__ for m in model.modules()}
    model.eval()
    ids, labels = torch.tensor(batch["input_ids"]), torch.tensor(batch["labels"])
    kwargs = {"position_ids": torch.tensor(batch["position_ids"])} if "position_ids" in batch else {
        "attention_mask": torch.tensor(batch["attention_mask"])}
    with torch.no_grad():
        logits = model(input_ids=ids, **kwargs).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)
    assert abs(loss.item() - trained["loss"]) < 1e-5, (loss.item(), trained["loss"])
    base = load_causal_lm(str(tiny_model_dir), dtype="float32")
    with torch.no_grad():
        base_logits = base(input_ids=ids, **kwargs).logits.float()
    assert (base_logits - logits).abs().max() > 1e-3  # the adapter changes the model: the test can fail


def test_resume_from_dcp_checkpoint_continues_the_same_losses(tiny_model_dir, sharded_run):
    out, full = sharded_run
    resumed_out = tempfile.mkdtemp(prefix="fjt-resume-")
    resumed = _spawn(str(tiny_model_dir), resumed_out, ac=True, resume_dir=str(Path(out) / "ckpt"))
    assert len(resumed) == STEPS - STEPS // 2
    assert max(abs(a - b) for a, b in zip(resumed, full[STEPS // 2 :])) < 1e-5, (resumed, full)
