"""Log-likelihood scoring of (context, continuation) token pairs: the Ray-free eval core.

Semantics follow lm-eval's `HFLM._loglikelihood_tokens` (truncate from the left to the model's
length, sum the continuation's log-probs, `is_greedy` when every continuation token is the argmax),
so scores equal lm-eval's own on the same model and data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fjordtune.errors import UserError
from fjordtune.model.load import load_causal_lm, quiet_peft_deprecations

log = logging.getLogger(__name__)


def load_adapter_verified(model: Any, adapter_dir: str | Path) -> Any:
    """Attach a peft adapter and check that every tensor in its file landed in the model."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    with quiet_peft_deprecations():
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.exists():
        raise UserError(f"{adapter_dir}: no adapter_model.safetensors (not a peft adapter folder?)")
    saved = load_file(str(weights))
    # adapter tensors only: with lm_head or embeddings among the targets peft would also count their frozen
    # base weights ("auto"), which fjordtune never saves (a 131k-vocab lm_head is 1 GiB)
    loaded = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    missing = sorted(set(loaded) - set(saved))
    unexpected = sorted(set(saved) - set(loaded))
    differ = [k for k in set(saved) & set(loaded) if not torch.equal(saved[k].to(loaded[k].dtype), loaded[k].cpu())]
    if missing or unexpected or differ:
        raise UserError(
            f"{adapter_dir}: adapter does not match the base model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, not loaded {differ[:3]}"
        )
    return peft_model


class Scorer:
    """A causal LM (optionally with a LoRA adapter) that scores token continuations."""

    def __init__(self, model_dir: str, *, adapter_dir: str | None = None, dtype: str = "float32",
                 device: str = "cpu", max_length: int | None = None) -> None:
        spread = device == "cuda" and torch.cuda.device_count() > 1
        # straight onto the device, a chunk at a time (never the whole model in host memory); larger
        # than one GPU: accelerate places the layers over every GPU this actor holds
        model = load_causal_lm(model_dir, dtype=dtype, device=device, device_map="auto" if spread else None)
        if adapter_dir:
            model = load_adapter_verified(model, adapter_dir)
        self.model = model.eval()
        self.device = torch.device("cuda:0" if spread else device)  # inputs go where the embedding is
        cfg = getattr(self.model, "config", None)
        self.max_length = max_length or int(getattr(cfg, "max_position_embeddings", 0) or 2048)

    @torch.inference_mode()
    def score(self, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), is_greedy) for each pair, in one padded forward."""
        inputs, cont_lens = [], []
        for ctx, cont in zip(contexts, continuations, strict=True):
            if not cont:
                raise ValueError("empty continuation")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):][:-1]
            inputs.append(whole)
            cont_lens.append(len(cont))
        width = max(len(x) for x in inputs)
        ids = torch.zeros((len(inputs), width), dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for i, x in enumerate(inputs):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        out = []
        for i, (x, n, cont) in enumerate(zip(inputs, cont_lens, continuations, strict=True)):
            # only the positions predicting the continuation: an fp32 log-softmax over the whole
            # [batch, tokens, vocab] block would cost GiBs at a 131k vocabulary
            span = torch.log_softmax(logits[i, len(x) - n : len(x)].float(), dim=-1).cpu()
            target = torch.tensor(list(cont)[-n:]).unsqueeze(-1)
            greedy = bool((span.argmax(dim=-1) == target.squeeze(-1)).all())
            out.append((float(span.gather(-1, target).sum()), greedy))
        return out
