"""`fjordtune.data.sft.pack`: packing must change no example's per-token loss, and must pay off.

Unit tier: the tiny random-init Mistral4 built in code (fp32, CPU) and the shipped demo rows.

The model is always called with `use_cache=False`. Mistral4's config has `use_cache=True`, and the model
then builds a KV cache even in training mode; with a cache, transformers skips its packed-sequence
detection (`masking_utils._preprocess_mask_arguments`), so the packed examples attend to each other
exactly as if no position ids were given (`test_a_kv_cache_turns_packing_detection_off`).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from fjordtune.data.sft import (
    IGNORE_INDEX,
    Example,
    collate,
    fit_length,
    pack,
    read_rows,
    token_efficiency,
    tokenize_row,
)
from fjordtune.errors import InternalError

REPO = Path(__file__).resolve().parents[1]
SFT_SAMPLE = REPO / "src" / "fjordtune" / "samples" / "sft" / "demo.jsonl"
MAX_SEQ_LEN = 256  # jobs/demo.yaml
BATCH = 2  # packs per batch, so that padded rows exist


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from fjordtune.model.load import load_tokenizer

    return load_tokenizer("builtin:demo")


@pytest.fixture(scope="module")
def model(tokenizer: Any) -> Any:
    from fjordtune.model.load import builtin_config, causal_lm_class

    cfg = builtin_config("tiny-mistral4", vocab_size=len(tokenizer))
    torch.manual_seed(0)
    return causal_lm_class(cfg)(cfg).float().eval()


@pytest.fixture(scope="module")
def demo_examples(tokenizer: Any) -> list[Example]:
    rows = read_rows([str(SFT_SAMPLE)])
    full = [tokenize_row(r, tokenizer, max_seq_len=None) for r in rows]
    kept, _ = fit_length(full, max_seq_len=MAX_SEQ_LEN, truncation="truncate")
    return kept


def label_logprobs(logprobs: torch.Tensor, labels: list[int], start: int, end: int) -> torch.Tensor:
    """Log-probs of the label tokens in [start + 1, end) of a row: the loss the trainer takes there.
    `logprobs[q]` is the log-prob of token q + 1 given tokens up to q."""
    return torch.stack([logprobs[q - 1] for q in range(start + 1, end) if labels[q] != IGNORE_INDEX])


def token_logprobs(model: Any, input_ids: list[list[int]], **kwargs: Any) -> torch.Tensor:
    ids = torch.tensor(input_ids)
    extra = {k: torch.tensor(v) for k, v in kwargs.items()}
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False, **extra).logits.float()
    return torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]


@pytest.fixture(scope="module")
def unpacked(model: Any, demo_examples: list[Example]) -> dict[tuple[int, ...], torch.Tensor]:
    """Each demo example scored alone (batch of 1, no padding), keyed by its token ids."""
    return {
        tuple(e.input_ids): label_logprobs(token_logprobs(model, [e.input_ids])[0], e.labels, 0, len(e.input_ids))
        for e in demo_examples
    }


def segments(p: Example) -> list[tuple[int, int]]:
    """[start, end) of each example inside a pack, from its position ids."""
    assert p.position_ids is not None
    starts = [i for i, pos in enumerate(p.position_ids) if pos == 0] + [len(p.input_ids)]
    return list(zip(starts, starts[1:]))


def packed_vs_unpacked(model: Any, packs: list[Example], unpacked: dict, *, pad_id: int,
                       position_ids: bool) -> tuple[float, int]:
    """Largest |packed - unpacked| label log-prob over all packs, and the number of label tokens compared."""
    worst, num_tokens = 0.0, 0
    for s in range(0, len(packs), BATCH):
        batch = collate(packs[s : s + BATCH], pad_id=pad_id)
        assert "attention_mask" not in batch
        kwargs = {"position_ids": batch["position_ids"]} if position_ids else {}
        logprobs = token_logprobs(model, batch["input_ids"], **kwargs)
        for row, p in enumerate(packs[s : s + BATCH]):
            for start, end in segments(p):
                want = unpacked[tuple(p.input_ids[start:end])]
                got = label_logprobs(logprobs[row], batch["labels"][row], start, end)
                assert got.shape == want.shape, "packing must score exactly the tokens unpacked training scores"
                worst = max(worst, (got - want).abs().max().item())
                num_tokens += len(got)
    return worst, num_tokens


# -- packing changes no loss -------------------------------------------------------------------------

def test_packing_keeps_every_token_loss(model: Any, tokenizer: Any, demo_examples: list[Example],
                                        unpacked: dict) -> None:
    packs = pack(demo_examples, max_seq_len=MAX_SEQ_LEN)
    assert BATCH < len(packs) < len(demo_examples)
    assert any(len({len(p.input_ids) for p in packs[s : s + BATCH]}) > 1 for s in range(0, len(packs), BATCH)), \
        "some batch must contain a padded row"
    worst, num_tokens = packed_vs_unpacked(model, packs, unpacked, pad_id=tokenizer.pad_token_id,
                                           position_ids=True)
    assert num_tokens == sum(e.num_labels for e in demo_examples) == sum(p.num_labels for p in packs)
    assert worst < 1e-5, f"packing changed a token's log-prob by {worst:.2e}"

    # the comparison can fail: without position ids, attention crosses example boundaries
    leaky, _ = packed_vs_unpacked(model, packs, unpacked, pad_id=tokenizer.pad_token_id, position_ids=False)
    assert leaky > 1e-3, f"without position ids the packed losses should differ, max diff {leaky:.2e}"


def test_a_kv_cache_turns_packing_detection_off(model: Any, tokenizer: Any, demo_examples: list[Example],
                                                unpacked: dict) -> None:
    """Documents why the trainer must pass `use_cache=False` (or set `config.use_cache = False`) with
    packs: with the config's default `use_cache=True`, even in training mode, transformers builds a cache
    and then ignores the packing in position_ids. If this fails after a transformers upgrade, packing is
    detected with a cache too and the requirement can go."""
    packs = pack(demo_examples, max_seq_len=MAX_SEQ_LEN)[:BATCH]
    batch = collate(packs, pad_id=tokenizer.pad_token_id)
    assert model.config.use_cache
    ids = torch.tensor(batch["input_ids"])
    with torch.no_grad():
        default = model(input_ids=ids, position_ids=torch.tensor(batch["position_ids"])).logits
        no_cache = model(input_ids=ids, position_ids=torch.tensor(batch["position_ids"]), use_cache=False).logits
    first, second = segments(packs[0])[:2]
    # the first example of a pack sees nothing before it; the second sees the first unless masked
    assert torch.allclose(default[0, : first[1]], no_cache[0, : first[1]], atol=1e-5)
    assert not torch.allclose(default[0, second[0] : second[1]], no_cache[0, second[0] : second[1]], atol=1e-3)


def test_padded_plain_batch_keeps_every_token_loss(model: Any, tokenizer: Any, demo_examples: list[Example],
                                                   unpacked: dict) -> None:
    worst, num_tokens = 0.0, 0
    for s in range(0, len(demo_examples), 4):
        chunk = demo_examples[s : s + 4]
        batch = collate(chunk, pad_id=tokenizer.pad_token_id)
        logprobs = token_logprobs(model, batch["input_ids"], attention_mask=batch["attention_mask"])
        for row, e in enumerate(chunk):
            assert batch["lengths"][row] == len(e.input_ids)
            got = label_logprobs(logprobs[row], batch["labels"][row], 0, len(e.input_ids))
            worst = max(worst, (got - unpacked[tuple(e.input_ids)]).abs().max().item())
            num_tokens += len(got)
    assert num_tokens == sum(e.num_labels for e in demo_examples)
    assert worst < 1e-5, f"padding changed a token's log-prob by {worst:.2e}"


def test_collated_packs_are_the_segments_transformers_sees(demo_examples: list[Example]) -> None:
    from transformers.masking_utils import find_packed_sequence_indices

    packs = pack(demo_examples, max_seq_len=MAX_SEQ_LEN)[-BATCH:]
    batch = collate(packs, pad_id=0)
    found = find_packed_sequence_indices(torch.tensor(batch["position_ids"]))
    assert found is not None
    for row, p in enumerate(packs):
        expected = [k for k, (a, b) in enumerate(segments(p)) for _ in range(a, b)]
        pad = len(batch["input_ids"][row]) - len(p.input_ids)
        expected += [len(segments(p))] * pad  # the padding is a segment of its own
        assert found[row].tolist() == expected
        assert batch["lengths"][row] == len(p.input_ids)


# -- first-fit decreasing ----------------------------------------------------------------------------

def synthetic(num: int, *, max_len: int, seed: int = 0) -> list[Example]:
    """Examples identifiable by their first token, with labels on a random tail."""
    rng = random.Random(seed)
    out = []
    for i in range(num):
        n = rng.randint(1, max_len)
        ids = [10_000 + i] + [rng.randrange(5, 500) for _ in range(n - 1)]
        cut = rng.randint(0, n)
        out.append(Example(ids, [IGNORE_INDEX] * cut + ids[cut:]))
    return out


def naive_ffd(lengths: list[int], max_seq_len: int) -> list[list[int]]:
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        b = next((b for b, r in enumerate(room) if r >= lengths[i]), len(bins))
        if b == len(bins):
            bins.append([])
            room.append(max_seq_len)
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


@pytest.mark.parametrize(("num", "max_len", "max_seq_len"), [(1, 5, 5), (50, 64, 64), (300, 40, 128), (200, 9, 9)])
def test_pack_properties(num: int, max_len: int, max_seq_len: int) -> None:
    exs = synthetic(num, max_len=max_len)
    packs = pack(exs, max_seq_len=max_seq_len)
    assert packs == pack(exs, max_seq_len=max_seq_len), "deterministic"
    members = []
    for p in packs:
        assert 0 < len(p.input_ids) <= max_seq_len
        assert len(p.labels) == len(p.position_ids) == len(p.input_ids)
        ids_in_pack = []
        for start, end in segments(p):
            ex = exs[p.input_ids[start] - 10_000]
            ids_in_pack.append(p.input_ids[start] - 10_000)
            assert p.input_ids[start:end] == ex.input_ids, "examples are whole, never split"
            assert p.position_ids[start:end] == list(range(len(ex.input_ids)))
            assert p.labels[start] == IGNORE_INDEX, "no example's first token is learned from the one before"
            assert p.labels[start + 1 : end] == ex.labels[1:]
        members.append(ids_in_pack)
    assert Counter(i for m in members for i in m) == Counter(range(num)), "every example exactly once"
    assert sum(p.num_labels for p in packs) == sum(e.num_labels for e in exs)
    assert members == naive_ffd([len(e.input_ids) for e in exs], max_seq_len), "first-fit decreasing"


def test_pack_refuses_examples_longer_than_a_pack() -> None:
    with pytest.raises(InternalError, match="fit_length"):
        pack(synthetic(5, max_len=30), max_seq_len=10)
    assert pack([], max_seq_len=10) == []


def test_pack_is_fast() -> None:
    rng = random.Random(1)
    exs = [Example([10_000 + i] + [7] * (n - 1), [IGNORE_INDEX] + [7] * (n - 1))
           for i, n in enumerate(rng.randint(1, 1024) for _ in range(13_375))]
    t0 = time.perf_counter()
    packs = pack(exs, max_seq_len=1024)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(e.input_ids) for e in exs)
    assert sum(len(p.input_ids) for p in packs) == tokens
    assert len(packs) <= 1.02 * tokens / 1024 + 1
    assert elapsed < 1.5, f"packing 13,375 examples took {elapsed:.2f} s"


# -- efficiency --------------------------------------------------------------------------------------

def test_packing_pays_off_on_the_demo(demo_examples: list[Example]) -> None:
    settings = dict(batch_size=4, world_size=2, seed=0)  # jobs/demo.yaml
    packs = pack(demo_examples, max_seq_len=MAX_SEQ_LEN)
    plain_real, plain_slots = token_efficiency(demo_examples, **settings)
    packed_real, packed_slots = token_efficiency(packs, **settings)
    plain, packed = plain_real / plain_slots, packed_real / packed_slots
    print(f"\ndemo, max_seq_len {MAX_SEQ_LEN}, micro_batch_size 4, 2 workers: "
          f"padded {plain_real}/{plain_slots} = {plain:.1%} real tokens; "
          f"packed ({len(demo_examples)} examples -> {len(packs)} packs) {packed_real}/{packed_slots} = {packed:.1%}")
    assert packed > plain


def test_the_trainer_scores_packed_batches_like_plain_ones(tiny_model_dir: Path, demo_examples: list[Example]) -> None:
    """The same check through the trainer's own path (`TrainerCore.eval_loss`, the forward that training
    uses, with the model it builds): held-out loss of the demo rows packed equals unpacked. Fails if the
    trainer's model ever builds a KV cache (see the module docstring)."""
    from fjordtune.config import load_job
    from fjordtune.data.sft import eval_batches
    from fjordtune.train.core import TrainerCore

    job = load_job(REPO / "jobs" / "demo.yaml")
    core = TrainerCore(job, model_dir=str(tiny_model_dir), device=torch.device("cpu"))
    pad = core.tokenizer.pad_token_id
    packs = pack(demo_examples, max_seq_len=MAX_SEQ_LEN)
    plain_loss, plain_tokens = core.eval_loss(eval_batches(demo_examples, batch_size=4, rank=0, world_size=1, pad_id=pad))
    packed_loss, packed_tokens = core.eval_loss(eval_batches(packs, batch_size=BATCH, rank=0, world_size=1, pad_id=pad))
    # the first label of each row inside a pack is masked; chat rows begin with template tokens that
    # carry no label, so the counts agree
    assert packed_tokens == plain_tokens
    assert abs(packed_loss - plain_loss) < 1e-5, (packed_loss, plain_loss)
