"""Scorer test helpers: random multiple-choice shaped token requests, and a random LoRA adapter."""

from __future__ import annotations

import random


def mc_requests(seed: int, *, num: int, max_context: int, choices: tuple[int, int], max_continuation: int,
                one_token_every_other: bool = False, vocab: int = 500) -> tuple[list[list[int]], list[list[int]]]:
    """`num` contexts of 2..max_context-1 tokens, each with choices[0]..choices[1]-1 continuations of
    1..max_continuation-1 tokens (every other one a single token with `one_token_every_other`)."""
    rng = random.Random(seed)
    ctxs, conts = [], []
    for _ in range(num):
        ctx = [rng.randrange(3, vocab) for _ in range(rng.randrange(2, max_context))]
        for k in range(rng.randrange(*choices)):
            ctxs.append(ctx)
            short = one_token_every_other and k % 2
            conts.append([rng.randrange(3, vocab) for _ in range(1 if short else rng.randrange(1, max_continuation))])
    return ctxs, conts


def random_lora_adapter(model_dir: str, out_dir: str) -> list[str]:
    """Save a LoRA adapter for the model at `model_dir` into `out_dir`: r=4 on the MLA projections and on
    both fused expert parameters, B drawn from N(0, 0.05) (seed 0) so that it changes the scores. Returns
    the names of its expert B tensors."""
    import torch
    from peft import LoraConfig, get_peft_model

    from fjordtune.model.load import load_causal_lm, quiet_peft_deprecations

    model = load_causal_lm(model_dir, dtype="float32")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_a_proj", "kv_b_proj", "o_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    with quiet_peft_deprecations():
        peft_model = get_peft_model(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(out_dir, save_embedding_layers=False)
    return [n for n, _ in peft_model.named_parameters() if "lora_B" in n and "experts" in n]
