#!/usr/bin/env python
"""Host memory of the training setup: sharded loading against today's whole-model load, same process tree.

    .venv/bin/python scripts/bench_loading.py [--world 2] [--layers 6] [--dtype float32]

Builds a random-init Mistral4 of at least 1 GiB in bf16 (saved as several safetensors shards), then
runs the setup of the training core on `--world` gloo ranks twice: the sharded path
(`TrainerCore`: meta device -> LoRA -> FSDP2 -> each rank reads its own slices) and the baseline
every rank used before (transformers' `from_pretrained` of the whole model, then LoRA and FSDP2).
Each rank's anonymous resident memory (`RssAnon`, sampled every 50 ms from outside) is read at the
start of setup and at its peak; the script prints the rise per rank and the ratio baseline / sharded.
`tests/test_sharded_loading.py` imports `build_model` and `run_ranks` from here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "demo.yaml"
SFT = ROOT / "src" / "fjordtune" / "samples" / "sft" / "demo.jsonl"
GiB = 1 << 30


def build_model(out: str | Path, *, num_layers: int = 6, max_shard_size: str = "400MB") -> tuple[Path, int]:
    """A random-init Mistral4 with ~100M parameters per layer, saved in bf16; returns (folder, parameters)."""
    import torch
    from transformers import Mistral4Config, Mistral4ForCausalLM

    from fjordtune.model.load import load_tokenizer
    from fjordtune.model.weights import default_dtype

    tok = load_tokenizer("builtin:demo")
    rope = dict(Mistral4Config().rope_parameters)
    rope.update(factor=4.0, original_max_position_embeddings=1024, max_position_embeddings=4096)
    cfg = Mistral4Config(
        vocab_size=len(tok), hidden_size=1024, intermediate_size=2048, moe_intermediate_size=1024,
        num_hidden_layers=num_layers, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=256,
        kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32, qk_head_dim=64, head_dim=64, v_head_dim=64,
        n_routed_experts=32, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0,
        max_position_embeddings=4096, rope_parameters=rope, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        architectures=["Mistral4ForCausalLM"],
    )
    torch.manual_seed(0)
    with default_dtype(torch.bfloat16):
        model = Mistral4ForCausalLM(cfg)
    out = Path(out)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tok.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def _overrides(dtype: str) -> list[str]:
    return [f"model.dtype={dtype}", "train.micro_batch_size=2", "data.max_seq_len=96",
            "train.activation_checkpointing=true"]


def _rank(rank: int, world: int, port: int, model_dir: str, out: str, mode: str, dtype: str, steps: int) -> None:
    """One rank: mark the start of setup, set the model up (`mode`), mark the end, train `steps` steps
    (world 1 or 2)."""
    import torch
    import torch.distributed as dist

    from fjordtune.config import load_job
    from fjordtune.data.sft import collate, read_rows
    from fjordtune.train.core import TrainerCore

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        job = load_job(JOB, _overrides(dtype))
        rows = read_rows([str(SFT)])
        t0 = time.monotonic()
        if mode == "sharded":
            core = TrainerCore(job, model_dir=model_dir, device=torch.device("cpu"))
        else:
            core = _whole_model_core(job, model_dir)
        t1 = time.monotonic()
        losses = []
        if steps:
            examples = core.examples(rows)
            for s in range(steps):  # the same global batches for any world size: 2 micro-batches of 2 rows,
                chunk = examples[s * 4: (s + 1) * 4]  # one per rank, or accumulated in one process
                micro = [collate(chunk[i: i + 2], pad_id=core.tokenizer.pad_token_id) for i in (0, 2)]
                losses.append(core.train_step(micro if world == 1 else micro[rank]).loss)
        Path(out, f"rank{rank}.json").write_text(json.dumps(
            {"pid": os.getpid(), "setup_start": t0, "setup_end": t1, "losses": losses}))
    finally:
        if world > 1:
            dist.destroy_process_group()


def _whole_model_core(job, model_dir: str):
    """The setup every rank ran before sharded loading: the whole model in host memory, then sharded."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import Mistral4ForCausalLM

    from fjordtune.train.fsdp import shard_model
    from fjordtune.train.lora import apply_lora

    model = Mistral4ForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, job.model.dtype))
    model, _ = apply_lora(model, rank=job.lora.rank, alpha=job.lora.alpha, dropout=0.0,
                          target_modules=job.lora.target_modules, target_parameters=job.lora.target_parameters)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if dist.is_initialized():
        shard_model(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)),
                    activation_checkpointing=job.train.activation_checkpointing)
    return model


def run_ranks(model_dir: str | Path, *, world: int, mode: str = "sharded", dtype: str = "float32",
              steps: int = 0) -> list[dict]:
    """Run `world` ranks (processes) with their RssAnon sampled from here; one dict per rank with `rise`
    (peak during setup minus the value at its start, bytes) and `losses`."""
    import multiprocessing as mp

    from fjordtune.telemetry.rss import RssSampler

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mkdtemp(prefix="fjt-bench-loading-")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, world, port, str(model_dir), out, mode, dtype, steps))
             for r in range(world)]
    with RssSampler(interval_s=0.05) as sampler:
        for p in procs:
            p.start()
            sampler.add(p.pid)
        for p in procs:
            p.join()
    try:
        if any(p.exitcode for p in procs):
            raise RuntimeError(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
        results = []
        for r in range(world):
            info = json.loads(Path(out, f"rank{r}.json").read_text())
            start = sampler.at(info["pid"], info["setup_start"])
            peak = sampler.peak(info["pid"], info["setup_start"], info["setup_end"])
            results.append({**info, "rank": r, "start": start, "peak": peak, "rise": peak - start})
        return results
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2, help="gloo ranks (processes)")
    parser.add_argument("--layers", type=int, default=6, help="decoder layers (~100M parameters each)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="load dtype")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    with tempfile.TemporaryDirectory(prefix="fjt-bench-model-") as tmp:
        model_dir, n = build_model(tmp, num_layers=args.layers)
        size = n * (4 if args.dtype == "float32" else 2)
        shards = len(list(Path(model_dir).glob("*.safetensors")))
        print(f"model: {n / 1e6:.0f}M parameters, {n * 2 / GiB:.2f} GiB in bf16 on disk ({shards} shards), "
              f"{size / GiB:.2f} GiB loaded in {args.dtype}; {args.world} gloo ranks")
        rises = {}
        for mode in ("whole", "sharded"):
            res = run_ranks(model_dir, world=args.world, mode=mode, dtype=args.dtype)
            rises[mode] = max(r["rise"] for r in res)
            per_rank = ", ".join(f"rank {r['rank']} {r['rise'] / GiB:.2f} GiB ({r['rise'] / size:.2f}x)" for r in res)
            print(f"{mode:>8}: peak RssAnon rise during setup: {per_rank}")
        print(f"ratio whole / sharded (largest rank): {rises['whole'] / rises['sharded']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
