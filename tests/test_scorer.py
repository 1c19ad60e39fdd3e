"""The Ray-free eval core: shared-context scoring against full-sequence scoring, merged adapters against
unmerged ones, and the planning of work units. Real model forward passes on a tiny Mistral4."""

from __future__ import annotations

import json

import pytest
import torch
from scoring_helpers import mc_requests, random_lora_adapter


def _questions(seed: int, *, num: int = 24) -> tuple[list[list[int]], list[list[int]]]:
    """Multiple-choice shaped requests: each context with 2-5 continuations of 1-8 tokens."""
    return mc_requests(seed, num=num, max_context=70, choices=(2, 6), max_continuation=9)


@pytest.fixture(scope="module", params=["packed", "packed-eager", "kv-cache"])
def scorer(tiny_model_dir, request):
    """Every way of sharing a context: one forward pass with a 4D mask (a boolean one for sdpa, an additive
    float one for eager attention), and a context pass followed by the continuations from its KV cache
    (attention kernels that take no 4D mask)."""
    from fjordtune.eval.scorer import Scorer

    s = Scorer(str(tiny_model_dir), dtype="float32")
    assert s.packed and s.attention == "sdpa", "the tiny model runs sdpa attention: packed by default"
    if request.param == "packed-eager":
        s.model.set_attn_implementation("eager")
        s.attention = s.model.config._attn_implementation
        assert s.attention == "eager"
    s.packed = request.param != "kv-cache"
    return s


def test_shared_context_equals_full_scoring_within_1e4(scorer):
    ctxs, conts = _questions(0)
    before, calls = scorer.tokens_forwarded, scorer.forward_calls
    shared = scorer.score(ctxs, conts)
    shared_tokens = scorer.tokens_forwarded - before
    assert scorer.forward_calls - calls == (1 if scorer.packed else 2)
    full = scorer.score(ctxs, conts, shared_context=False)
    full_tokens = scorer.tokens_forwarded - before - shared_tokens
    diff = max(abs(a[0] - b[0]) for a, b in zip(shared, full, strict=True))
    assert diff < 1e-4, diff
    assert [a[1] for a in shared] == [b[1] for b in full]
    # the same answers, from fewer tokens: every context once instead of once per choice
    assert shared_tokens < 0.5 * full_tokens, (shared_tokens, full_tokens)
    # and it is a real comparison: other continuations score differently
    other = scorer.score(ctxs, [c[::-1] if len(c) > 1 else [c[0] + 1] for c in conts])
    assert max(abs(a[0] - b[0]) for a, b in zip(shared, other, strict=True)) > 1e-2


def test_shared_context_under_left_truncation_and_single_token_choices(scorer):
    ctxs, conts = _questions(1, num=10)
    conts = [c[:1] if i % 2 else c for i, c in enumerate(conts)]  # many one-token continuations
    old = scorer.max_length
    try:
        scorer.max_length = 24  # most pairs are longer: truncated from the left, as lm-eval does
        shared = scorer.score(ctxs, conts)
        full = scorer.score(ctxs, conts, shared_context=False)
    finally:
        scorer.max_length = old
    assert max(abs(a[0] - b[0]) for a, b in zip(shared, full, strict=True)) < 1e-4
    assert [a[1] for a in shared] == [b[1] for b in full]


def test_merged_adapter_scores_like_the_unmerged_one_experts_included(tiny_model_dir, tmp_path):
    from fjordtune.eval.scorer import Scorer

    expert_b = random_lora_adapter(str(tiny_model_dir), str(tmp_path / "adapter"))
    assert expert_b, "the adapter must reach the fused experts"

    ctxs, conts = _questions(2, num=8)
    base = Scorer(str(tiny_model_dir), dtype="float32").score(ctxs, conts)
    merged_scorer = Scorer(str(tiny_model_dir), adapter_dir=str(tmp_path / "adapter"), dtype="float32")
    assert not any("lora_" in n for n, _ in merged_scorer.model.named_modules()), "adapter left unmerged"
    merged = merged_scorer.score(ctxs, conts)
    unmerged = Scorer(str(tiny_model_dir), adapter_dir=str(tmp_path / "adapter"), dtype="float32",
                      merge_adapter=False).score(ctxs, conts)
    assert max(abs(a[0] - b[0]) for a, b in zip(merged, unmerged, strict=True)) < 1e-4
    # the adapter matters (so the comparison above can fail), and the experts' part of it too
    assert max(abs(a[0] - b[0]) for a, b in zip(merged, base, strict=True)) > 1e-2
    no_experts = tmp_path / "no-experts"
    from safetensors.torch import load_file, save_file

    (no_experts).mkdir()
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    save_file({k: (torch.zeros_like(v) if "experts" in k and "lora_B" in k else v) for k, v in weights.items()},
              str(no_experts / "adapter_model.safetensors"), metadata={"format": "pt"})
    (no_experts / "adapter_config.json").write_text((tmp_path / "adapter" / "adapter_config.json").read_text())
    attn_only = Scorer(str(tiny_model_dir), adapter_dir=str(no_experts), dtype="float32").score(ctxs, conts)
    assert max(abs(a[0] - b[0]) for a, b in zip(merged, attn_only, strict=True)) > 1e-3


def test_units_keep_a_context_together_and_are_deterministic():
    from fjordtune.eval.units import plan_units, token_counts

    ctxs, conts = _questions(3, num=40)
    ctx_text = [" ".join(f"t{t}" for t in c) + "\nSvar:" for c in ctxs]  # text requests, as lm-eval gives them
    reqs = [(c, " " + " ".join(f"w{t}" for t in k)) for c, k in zip(ctx_text, conts, strict=True)]
    units = plan_units(reqs, batch_size=8)
    again = plan_units(reqs, batch_size=8)
    assert [u.key for u in units] == [u.key for u in again]
    assert sorted(i for u in units for i in u.indices) == list(range(len(reqs)))
    assert all(len(u.indices) <= 8 for u in units)
    # a question's choices (<= 5 here, batch 8) never straddle two units
    home = {ctx: set() for ctx in ctx_text}
    for u in units:
        for i in u.indices:
            home[ctx_text[i]].add(u.key)
    assert all(len(keys) == 1 for keys in home.values())
    # the key is the content: another batch size gives other units, a changed request another key
    changed = [(c, k + "!") if i == 0 else (c, k) for i, (c, k) in enumerate(reqs)]
    assert len({u.key for u in plan_units(changed, batch_size=8)} ^ {u.key for u in units}) == 2
    for u in units:  # what an actor receives is what was planned, each context sent once
        assert u.requests_of(u.payload()) == list(zip(u.contexts, u.continuations, strict=True))
        assert u.payload().count(json.dumps(u.contexts[0], ensure_ascii=False)) == 1
    # longest first, in words and punctuation
    from fjordtune.eval.units import _WORDS

    lengths = [max(len(_WORDS.findall(reqs[i][0])) for i in u.indices) for u in units]
    assert lengths == sorted(lengths, reverse=True)
    token_reqs = list(zip(ctxs, conts, strict=True))
    full, shared = token_counts(token_reqs)
    assert full == sum(len(c) + len(k) - 1 for c, k in token_reqs)
    assert shared == sum(len(k) - 1 for _, k in token_reqs) + sum(len(c) for c in {tuple(c) for c in ctxs})


def test_progress_says_how_far_how_fast_and_when_done(caplog, monkeypatch):
    import logging

    from fjordtune.eval import ray_lm

    clock = iter([0.0, 10.0, 20.0, 30.0, 30.0])
    monkeypatch.setattr(ray_lm.time, "monotonic", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="fjordtune.eval.ray_lm"):
        progress = ray_lm.EvalProgress("base", total=400, every_s=5)
        progress.update(100)  # t=10: 10 requests/s, 300 left
        progress.update(100)  # t=20
        progress.update(200)  # t=30: done
        progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "base: 100/400 requests (25.0%), 10.0 requests/s, ETA 0m30s", lines
    assert lines[1].startswith("base: 200/400 requests (50.0%)") and lines[1].endswith("ETA 0m20s")
    assert lines[-1].startswith("base: 400/400 requests (100.0%)") and lines[-1].endswith("done")
    assert ray_lm._duration(3725) == "1h02m" and ray_lm._duration(None) == "unknown"
