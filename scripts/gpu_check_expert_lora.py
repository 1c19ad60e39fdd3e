#!/usr/bin/env python
"""GPU check of grouped expert LoRA: peak memory and step time of both implementations on one GPU.

    PYTHONPATH=src python scripts/gpu_check_expert_lora.py [--layers 2] [--steps 5] [--out DIR]
    PYTHONPATH=src python scripts/gpu_check_expert_lora.py --tiny        # CPU smoke run (tests/test_expert_lora.py)

A Mistral4 at the real model's width (hidden 4096, 128 experts of 2048, top-4, MLA, vocab 131072) with only
`--layers` decoder layers, random bf16 weights, LoRA r=32 / alpha 64 on the MLA projections and both expert
stacks, adapters in fp32 (as the trainer keeps them), seq 1024, micro-batch 1, no activation checkpointing
(one GPU, no FSDP: each layer's saved tensors stay, which is where W+BA shows). For `peft` and `grouped` in
turn, from the same weights and adapters: the first forward's logits (their largest difference), then
`--steps` timed steps (forward, backward, AdamW) after one warm-up, `torch.cuda.max_memory_allocated` over
the steps, and the same figures for the base model alone (no step) as a floor. Needs torch, transformers
(Mistral4: >= 5.4) and peft only: no Ray, no pydantic. Writes `expert_lora.json` to `--out` (default: $OUT
or ./gpu-check) and prints one line per implementation. Results: docs/gpu-results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

GiB = 1 << 30
TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def build(args: argparse.Namespace, device: Any) -> tuple[Any, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Mistral4Config, Mistral4ForCausalLM

    if args.tiny:
        cfg = Mistral4Config(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                             num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                             q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16,
                             n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1)
    else:  # Mistral Small 4's text config, fewer layers
        cfg = Mistral4Config(num_hidden_layers=args.layers)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Mistral4ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.config.use_cache = False
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, target_parameters=EXPERTS)
    model = get_peft_model(model, lora)
    gen = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()  # fp32 adapters on a bf16 base, as the trainer does
                if "lora_B" in name:  # peft starts B at zero, which would hide a wrong B
                    p.copy_(torch.randn(p.shape, generator=gen).mul_(0.01))
    return model, cfg


def measure(model: Any, ids: Any, steps: int, device: Any) -> dict[str, Any]:
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    cuda = device.type == "cuda"
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(steps + 1):
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    del opt
    return {"median_step_s": round(statistics.median(times), 4), "step_s": [round(t, 4) for t in times],
            "peak_allocated_gib": round(peak / GiB, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="decoder layers at full width (default 2)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per implementation (default 5)")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per step (default 1024)")
    ap.add_argument("--rank", type=int, default=32, help="LoRA rank (default 32, alpha 2x)")
    ap.add_argument("--tiny", action="store_true", help="toy width on CPU: checks the script, measures nothing")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-check"), help="folder for expert_lora.json")
    args = ap.parse_args()

    import torch

    from fjordtune.train.expert_lora import use_grouped

    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --tiny for a CPU smoke run)")
    t0 = time.perf_counter()
    peft, cfg = build(args, device)
    base_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        ref = peft(input_ids=ids).logits.float()
    grouped = peft  # measured one after the other in the same model: no second copy of the weights
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "peft": __import__("peft").__version__},
        "config": {"layers": args.layers, "hidden": cfg.hidden_size, "experts": cfg.n_routed_experts,
                   "top_k": cfg.num_experts_per_tok, "seq": args.seq, "rank": args.rank},
        "model_and_adapters_gib": round(base_bytes / GiB, 2),
    }
    initial = {n: p.detach().clone() for n, p in peft.named_parameters() if p.requires_grad}
    results["peft"] = measure(peft, ids, args.steps, device)
    with torch.no_grad():  # the same starting adapters for the grouped run
        for n, p in peft.named_parameters():
            if n in initial:
                p.copy_(initial[n])
    del initial
    experts = next(m for n, m in peft.named_modules() if n.endswith("layers.0.mlp.experts"))
    hidden = torch.randn(args.seq, cfg.hidden_size, generator=torch.Generator().manual_seed(3)).to(device, torch.bfloat16)
    top = torch.randn(args.seq, cfg.n_routed_experts, generator=torch.Generator().manual_seed(4)).to(device)
    weights, index = top.softmax(-1).topk(cfg.num_experts_per_tok, dim=-1)
    with torch.no_grad():
        module_ref = experts(hidden, index, weights).float()  # peft's forward, W+BA
    impls = use_grouped(grouped)
    assert set(impls.values()) == {"grouped"}, impls
    with torch.no_grad():  # one experts module, the same routing: bf16 rounding only, no routing flips
        module_diff = (experts(hidden, index, weights).float() - module_ref).abs().max().item()
    results["experts_module_max_diff"] = module_diff
    results["experts_module_scale"] = module_ref.abs().max().item()
    with torch.no_grad():
        results["max_logit_diff"] = (grouped(input_ids=ids).logits.float() - ref).abs().max().item()
        results["logit_scale"] = ref.abs().max().item()
    results["grouped"] = measure(grouped, ids, args.steps, device)
    p, g = results["peft"], results["grouped"]
    results["grouped_over_peft"] = {"step_time": round(g["median_step_s"] / p["median_step_s"], 3),
                                    "peak": round(g["peak_allocated_gib"] / max(p["peak_allocated_gib"], 1e-9), 3)}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "expert_lora.json").write_text(json.dumps(results, indent=2))
    for name in ("peft", "grouped"):
        r = results[name]
        print(f"{name:<8} peak {r['peak_allocated_gib']:7.2f} GiB  step {r['median_step_s']:.3f} s (median of "
              f"{args.steps})")
    print(f"grouped / peft: step time {results['grouped_over_peft']['step_time']}, peak "
          f"{results['grouped_over_peft']['peak']}; max logit diff {results['max_logit_diff']:.3g} "
          f"(logits up to {results['logit_scale']:.3g}; bf16 routing can flip); one experts module, same routing: "
          f"max diff {module_diff:.3g} (outputs up to {results['experts_module_scale']:.3g}); "
          f"{results['seconds']} s in all")


if __name__ == "__main__":
    main()
