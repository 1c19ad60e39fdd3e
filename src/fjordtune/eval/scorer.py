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

PACKABLE_ATTENTION = ("sdpa", "eager")
"""Attention implementations that take a custom 4D mask as given (transformers' masking_utils returns a
4D mask as-is; flash-attention kernels only take 2D padding masks)."""


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
    """A causal LM (optionally with a LoRA adapter, merged at load) that scores token continuations.

    `score` forwards each distinct context once and scores every continuation from its KV cache (a
    multiple-choice question's 4-5 choices share one context, which is ~90% of the tokens); `score_full`
    forwards every (context, continuation) pair in full, as lm-eval's `hf` backend does. Both give the same
    log-likelihoods to float rounding (tested within 1e-4).
    """

    def __init__(self, model_dir: str, *, adapter_dir: str | None = None, dtype: str = "float32",
                 device: str = "cpu", max_length: int | None = None, merge_adapter: bool = True) -> None:
        spread = device == "cuda" and torch.cuda.device_count() > 1
        # straight onto the device, a chunk at a time (never the whole model in host memory); larger
        # than one GPU: accelerate places the layers over every GPU this actor holds
        model = load_causal_lm(model_dir, dtype=dtype, device=device, device_map="auto" if spread else None)
        if adapter_dir:
            model = load_adapter_verified(model, adapter_dir)
            if merge_adapter:
                model = merge_adapter_weights(model)
        self._setup(model, device=torch.device("cuda:0" if spread else device), max_length=max_length)

    @classmethod
    def from_model(cls, model: Any, *, device: str | torch.device, max_length: int | None = None) -> Scorer:
        """A Scorer around a model already loaded (a tensor-parallel shard: `eval.tp`); inputs go to `device`."""
        scorer = cls.__new__(cls)
        scorer._setup(model, device=torch.device(device), max_length=max_length)
        return scorer

    def _setup(self, model: Any, *, device: torch.device, max_length: int | None) -> None:
        self.model = model.eval()
        self.device = device  # inputs go where the embedding is
        cfg = getattr(self.model, "config", None)
        self.max_length = max_length or int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        self.tokens_forwarded = 0
        """Input tokens sent through the model so far (padding excluded): the work shared contexts save."""
        self.forward_calls = 0
        """Forward passes run so far."""
        self.attention = getattr(cfg, "_attn_implementation", None)
        self.packed = self.attention in PACKABLE_ATTENTION
        """Shared contexts in one forward pass per unit (`_score_packed`: a custom 4D mask, which sdpa and
        eager attention take as given); False: a context pass, then its continuations from a copy of its
        KV cache (`_score_shared`, for attention kernels that only take a 2D padding mask)."""

    def score(self, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], *,
              shared_context: bool = True) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), is_greedy) for each pair.

        Pairs are truncated from the left to the model's length first, as lm-eval does; pairs that share
        the resulting context share one forward pass of it (`shared_context=False`: every pair in full).
        """
        pairs = []
        for ctx, cont in zip(contexts, continuations, strict=True):
            if not cont:
                raise ValueError("empty continuation")
            cont = list(cont)
            whole = (list(ctx) + cont)[-(self.max_length + 1):]
            pairs.append((tuple(whole[: len(whole) - len(cont)]), cont))
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        shared = [i for i, (ctx, _) in enumerate(pairs) if ctx] if shared_context else []
        full = sorted(set(range(len(pairs))) - set(shared))
        if shared:
            method = self._score_packed if self.packed else self._score_shared
            for i, r in zip(shared, method([pairs[i] for i in shared]), strict=True):
                out[i] = r
        if full:
            got = self.score_full([list(pairs[i][0]) for i in full], [pairs[i][1] for i in full])
            for i, r in zip(full, got, strict=True):
                out[i] = r
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def score_full(self, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> list[tuple[float, bool]]:
        """Every pair in one padded forward of context + continuation, as lm-eval's `hf` backend does."""
        inputs, cont_lens = [], []
        for ctx, cont in zip(contexts, continuations, strict=True):
            if not cont:
                raise ValueError("empty continuation")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):][:-1]
            inputs.append(whole)
            cont_lens.append(len(cont))
        ids, mask = _pad(inputs, left=False)
        self.tokens_forwarded += sum(len(x) for x in inputs)
        self.forward_calls += 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        out = []
        for i, (x, n, cont) in enumerate(zip(inputs, cont_lens, continuations, strict=True)):
            # only the positions predicting the continuation: an fp32 log-softmax over the whole
            # [batch, tokens, vocab] block would cost GiBs at a 131k vocabulary
            out.append(_continuation_score(logits[i, len(x) - n : len(x)], list(cont)[-n:]))
        return out

    @torch.inference_mode()
    def _score_packed(self, pairs: list[tuple[tuple[int, ...], list[int]]]) -> list[tuple[float, bool]]:
        """One forward pass for a unit: each distinct context once, followed in its row by every one of its
        continuations, each continuation seeing the context and itself only (a 4D mask) at the positions it
        would have after the context alone.

        A row is `[left padding][context][cont 1 minus its last token][cont 2 ...][right padding]`: every
        context ends in the same column, so the logits kept (`logits_to_keep`) are that column (predicting
        each continuation's first token) and the continuation columns after it, never the contexts'. The
        log-softmax runs once over that block and every request's tokens are gathered from it at once.
        """
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(pairs):
            groups.setdefault(ctx, []).append(i)
        ctxs = list(groups)
        width_ctx = max(len(c) for c in ctxs)
        width_tail = max(sum(len(pairs[i][1]) - 1 for i in members) for members in groups.values())
        rows, width = len(ctxs), width_ctx + width_tail
        ids = torch.zeros((rows, width), dtype=torch.long)
        pos = torch.zeros((rows, width), dtype=torch.long)
        seg = torch.full((rows, width), -1, dtype=torch.long)  # -1 padding, 0 context, k + 1 continuation k
        where: list[tuple[int, int]] = [(0, 0)] * len(pairs)  # (row, first kept column after the context's)
        for r, (ctx, members) in enumerate(groups.items()):
            start = width_ctx - len(ctx)
            ids[r, start:width_ctx] = torch.tensor(ctx, dtype=torch.long)
            pos[r, start:width_ctx] = torch.arange(len(ctx))
            seg[r, start:width_ctx] = 0
            col = width_ctx
            for k, i in enumerate(members):
                tail = pairs[i][1][:-1]
                where[i] = (r, 1 + col - width_ctx)
                if tail:
                    ids[r, col : col + len(tail)] = torch.tensor(tail, dtype=torch.long)
                    pos[r, col : col + len(tail)] = torch.arange(len(ctx), len(ctx) + len(tail))
                    seg[r, col : col + len(tail)] = k + 1
                col += len(tail)
        cols = torch.arange(width)
        sq, sk = seg.unsqueeze(-1), seg.unsqueeze(-2)  # [rows, query, 1], [rows, 1, key]
        allowed = (cols.view(1, 1, -1) <= cols.view(1, -1, 1)) & (sk >= 0) & (sq >= 0) & ((sk == 0) | (sk == sq))
        allowed |= torch.eye(width, dtype=torch.bool).unsqueeze(0)  # padding sees itself: no empty softmax row
        if self.attention == "sdpa":  # True = attend; 15% faster in sdpa than the additive float mask eager needs
            mask = allowed.unsqueeze(1)
        else:
            dtype = next(self.model.parameters()).dtype
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)
        self.tokens_forwarded += int((seg >= 0).sum())
        self.forward_calls += 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=pos.to(self.device), use_cache=False, logits_to_keep=width_tail + 1).logits
        logp = torch.log_softmax(logits.float(), dim=-1)  # [rows, 1 + width_tail, vocab]
        index_r, index_c, targets, bounds = [], [], [], [0]
        for i, (_, cont) in enumerate(pairs):
            r, c = where[i]
            index_r += [r] * len(cont)
            index_c += [0] + list(range(c, c + len(cont) - 1))
            targets += cont
            bounds.append(len(targets))
        at = (torch.tensor(index_r), torch.tensor(index_c))
        tokens = torch.tensor(targets)
        picked = logp[at[0].to(logp.device), at[1].to(logp.device), tokens.to(logp.device)].cpu()
        hits = (logp.argmax(dim=-1)[at[0].to(logp.device), at[1].to(logp.device)].cpu() == tokens).tolist()
        return [(float(picked[a:b].sum()), all(hits[a:b])) for a, b in zip(bounds, bounds[1:], strict=False)]

    @torch.inference_mode()
    def _score_shared(self, pairs: list[tuple[tuple[int, ...], list[int]]]) -> list[tuple[float, bool]]:
        """Forward each distinct context once (left-padded, so that its last token's logits are the last
        column), then every continuation from a copy of its context's KV cache."""
        groups: dict[tuple[int, ...], int] = {}
        owner = [groups.setdefault(ctx, len(groups)) for ctx, _ in pairs]
        ctxs = list(groups)
        ids, mask = _pad(ctxs, left=True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.tokens_forwarded += sum(len(c) for c in ctxs)
        self.forward_calls += 1
        first = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                           position_ids=positions.to(self.device), use_cache=True, logits_to_keep=1)
        last = first.logits[:, -1]  # [contexts, vocab]: predicts each continuation's first token
        rest = [i for i, (_, cont) in enumerate(pairs) if len(cont) > 1]
        later: dict[int, torch.Tensor] = {}
        if rest:
            cache = first.cache
            # CPU indices: with device_map each layer's cache lives on its own GPU, and indexing accepts them
            cache.batch_select_indices(torch.tensor([owner[i] for i in rest]))
            tails = [pairs[i][1][:-1] for i in rest]
            tail_ids, tail_mask = _pad(tails, left=False)
            start = torch.tensor([len(ctxs[owner[i]]) for i in rest]).unsqueeze(-1)
            tail_pos = start + torch.arange(tail_ids.shape[1]).unsqueeze(0)
            self.tokens_forwarded += sum(len(t) for t in tails)
            self.forward_calls += 1
            second = self.model(
                input_ids=tail_ids.to(self.device),
                attention_mask=torch.cat([mask[[owner[i] for i in rest]], tail_mask], dim=1).to(self.device),
                position_ids=tail_pos.to(self.device), cache=cache, use_cache=True,
            )
            for row, i in enumerate(rest):
                later[i] = second.logits[row, : len(pairs[i][1]) - 1]
        out = []
        for i, (_, cont) in enumerate(pairs):
            span = last[owner[i]].unsqueeze(0)
            if i in later:
                span = torch.cat([span, later[i]], dim=0)
            out.append(_continuation_score(span, cont))
        return out


def merge_adapter_weights(peft_model: Any) -> Any:
    """Fold a LoRA adapter into the base weights (W + scale * B @ A), fused experts included, and return
    the plain model: evaluation then runs at the base model's cost instead of recomputing the LoRA
    product on every forward pass. In bf16 the merged weights are rounded to bf16 once."""
    from fjordtune.model.load import quiet_peft_deprecations

    with quiet_peft_deprecations():
        merged = peft_model.merge_and_unload(safe_merge=True)
    leftover = [name for name, _ in merged.named_modules() if "lora_" in name]
    if leftover:
        raise RuntimeError(f"adapter merge left LoRA modules behind: {leftover[:3]}")
    return merged


def _pad(rows: Sequence[Sequence[int]], *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, width] token ids and attention mask, padded with zeros on the left or the right."""
    width = max(len(x) for x in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, x in enumerate(rows):
        span = slice(width - len(x), width) if left else slice(0, len(x))
        ids[i, span] = torch.tensor(list(x), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _continuation_score(logits: torch.Tensor, cont: Sequence[int]) -> tuple[float, bool]:
    """(sum of log-probs of `cont`, whether every token is the argmax) from the logits predicting it."""
    span = torch.log_softmax(logits.float(), dim=-1).cpu()
    target = torch.tensor(list(cont), dtype=torch.long).unsqueeze(-1)
    greedy = bool((span.argmax(dim=-1) == target.squeeze(-1)).all())
    return float(span.gather(-1, target).sum()), greedy
