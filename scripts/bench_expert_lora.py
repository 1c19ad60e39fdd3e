#!/usr/bin/env python
"""Expert LoRA without W+BA (`lora.expert_impl: grouped`) against peft's `target_parameters` implementation.

    .venv/bin/python scripts/bench_expert_lora.py [--skip-traced] [--steps 6] [--json out.json]

1. **Traced memory, full Mistral Small 4** (fake tensors, nothing allocated; about 75 s per setting):
   `fjordtune preflight jobs/norskmistral-119b.yaml --set model.path=builtin:mistral-small-4 --method traced
   --json` with `lora.expert_impl=grouped` and `=peft` (7 ranks, seq 1024, experts covered, activation
   checkpointing), plus grouped with FSDP2's implicit forward prefetch (`train.forward_prefetch=implicit`),
   which shows which part of the saving comes from which change. Per-rank training peak, traced and analytic.
2. **Step time, real tensors on this CPU**: a small Mistral4 (hidden 512, 4 layers, 16 experts top-2, LoRA
   r=16 on the MLA projections and both expert stacks, fp32, 512 tokens). Both models start from the same
   weights and adapters; steps (forward, backward, AdamW) alternate between them so that machine noise hits
   both alike. Reported: median step time of each, the ratio grouped / peft, the largest logit difference
   of the first step, and the bytes autograd saves for backward in one forward (saved-tensor hooks, parameters
   excluded).

Results: docs/benchmarks.md, "Expert LoRA without W+BA".
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "norskmistral-119b.yaml"
GiB = 1 << 30
SETTINGS = {
    "peft": ["lora.expert_impl=peft"],
    "grouped": ["lora.expert_impl=grouped"],
    "grouped, implicit prefetch": ["lora.expert_impl=grouped", "train.forward_prefetch=implicit"],
}


def traced(settings: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "fjordtune", "preflight", str(JOB), "--set", "model.path=builtin:mistral-small-4",
           *sum((["--set", s] for s in settings), []), "--method", "traced", "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    if not proc.stdout.strip():
        raise SystemExit(f"preflight failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout)
    t = report["traced"]
    return {"traced_training_peak_gib": t["training_peak_bytes"] / GiB,
            "analytic_live_gib": t["analytic_training_live_bytes"] / GiB,
            "analytic_total_gib": report["per_worker_bytes"] / GiB, "peak_moment": report["peak_moment"],
            "min_gpus": report["min_gpus"], "seconds": round(time.perf_counter() - t0, 1)}


def step_time(steps: int) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Mistral4Config, Mistral4ForCausalLM

    from fjordtune.model.load import quiet_peft_deprecations
    from fjordtune.train.expert_lora import use_grouped

    torch.manual_seed(0)
    cfg = Mistral4Config(vocab_size=2048, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=128,
                         kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64,
                         n_routed_experts=16, num_experts_per_tok=2, n_shared_experts=1)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                                                           "kv_b_proj", "o_proj"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    with quiet_peft_deprecations():
        peft = get_peft_model(Mistral4ForCausalLM(cfg), lora)
    with torch.no_grad():  # B = 0 would make both trivially equal
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    grouped = copy.deepcopy(peft)
    assert set(use_grouped(grouped).values()) == {"grouped"}
    models = {"peft": peft, "grouped": grouped}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}
    ids = torch.randint(0, cfg.vocab_size, (1, 512), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (peft(input_ids=ids).logits - grouped(input_ids=ids).logits).abs().max().item()
    saved = {k: _saved_bytes(m, ids) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(steps + 2):  # two warm-up rounds
        for k in (("peft", "grouped") if i % 2 else ("grouped", "peft")):
            t0 = time.perf_counter()
            models[k](input_ids=ids, labels=ids).loss.backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            if i >= 2:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_step_s": {k: round(v, 3) for k, v in med.items()}, "ratio_grouped_over_peft":
            round(med["grouped"] / med["peft"], 3), "first_step_max_logit_diff": diff,
            "saved_for_backward_mib": {k: round(v / (1 << 20), 1) for k, v in saved.items()},
            "threads": torch.get_num_threads(), "steps": steps}


def _saved_bytes(model: Any, ids: Any) -> int:
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-traced", action="store_true", help="only the CPU step-time part (seconds, not minutes)")
    ap.add_argument("--steps", type=int, default=6, help="measured steps per implementation (default 6)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    out: dict[str, Any] = {"machine": f"{platform.machine()}, {platform.python_version()}"}
    if not args.skip_traced:
        out["traced"] = {}
        for name, settings in SETTINGS.items():
            print(f"tracing Mistral Small 4 at 7 ranks, {name} ...", file=sys.stderr, flush=True)
            out["traced"][name] = r = traced(settings)
            print(f"  {name:<28} traced {r['traced_training_peak_gib']:.2f} GiB, analytic live "
                  f"{r['analytic_live_gib']:.2f} GiB (total with overheads {r['analytic_total_gib']:.2f} GiB, "
                  f"peak at {r['peak_moment']}), fits from {r['min_gpus']} GPUs; {r['seconds']} s", flush=True)
        t = out["traced"]
        below = t["peft"]["traced_training_peak_gib"] - t["grouped"]["traced_training_peak_gib"]
        out["traced_gib_below_peft"] = round(below, 2)
        print(f"grouped is {below:.2f} GiB per rank below peft (traced; target: at least 5)")
    print("CPU step time, small Mistral4 ...", file=sys.stderr, flush=True)
    out["cpu"] = s = step_time(args.steps)
    print(f"step (fwd+bwd+AdamW): peft {s['median_step_s']['peft']} s, grouped {s['median_step_s']['grouped']} s: "
          f"grouped / peft = {s['ratio_grouped_over_peft']} (median of {args.steps}); saved for backward: "
          f"peft {s['saved_for_backward_mib']['peft']} MiB, grouped {s['saved_for_backward_mib']['grouped']} MiB; "
          f"max logit diff {s['first_step_max_logit_diff']:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
