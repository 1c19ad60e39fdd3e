"""`fjordtune.data.sft`: reading chat rows, loss masks on assistant turns, and per-rank epoch batches.

Unit tier, with the real tokenizer shipped in `fjordtune/assets/tokenizer` (no download).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fjordtune.data.sft import (
    IGNORE_INDEX,
    Example,
    epoch_batches,
    read_rows,
    steps_per_epoch,
    tokenize_row,
)
from fjordtune.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SFT_SAMPLE = REPO / "src" / "fjordtune" / "samples" / "sft" / "demo.jsonl"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from fjordtune.model.load import load_tokenizer

    return load_tokenizer("builtin:demo")


def chat(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


GOOD = chat(("user", "Hva er hovedstaden i Norge?"), ("assistant", "Oslo."))


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


# -- read_rows ---------------------------------------------------------------------------------------

def test_read_shipped_sample() -> None:
    rows = read_rows([str(SFT_SAMPLE)])
    assert len(rows) == sum(1 for line in SFT_SAMPLE.read_text().splitlines() if line.strip())
    assert all(any(m["role"] == "assistant" for m in r["messages"]) for r in rows)


def test_read_rows_several_files_and_blank_lines(tmp_path: Path) -> None:
    a = write_lines(tmp_path / "a.jsonl", [json.dumps(GOOD), "", "   "])
    b = write_lines(tmp_path / "b.jsonl", [json.dumps(GOOD), json.dumps({**GOOD, "lang": "nno"})])
    rows = read_rows([a, b])
    assert len(rows) == 3 and rows[2]["lang"] == "nno"


@pytest.mark.parametrize(
    ("bad_line", "fragment"),
    [
        ('{"messages": [', "not valid JSON"),
        ('{"text": "no messages here"}', "expected"),
        ('{"messages": []}', "expected"),
        ('{"messages": [{"role": "user"}]}', "expected"),  # no content
        ('{"messages": [{"role": "narrator", "content": "x"}]}', "expected"),
        ('["a", "list"]', "expected"),
        (json.dumps(chat(("system", "Vær kort."), ("user", "Hei!"))), "no assistant turn"),
    ],
)
def test_read_rows_errors_name_file_and_line(tmp_path: Path, bad_line: str, fragment: str) -> None:
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(GOOD), "", json.dumps(GOOD), bad_line])
    with pytest.raises(UserError) as info:
        read_rows([path])
    (line,) = info.value.lines
    assert line.startswith(f"{path}:4: "), line  # line numbers count blank lines, from 1
    assert fragment in line


def test_read_rows_missing_file_and_no_rows(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(UserError) as info:
        read_rows([missing])
    assert missing in str(info.value)
    empty = write_lines(tmp_path / "empty.jsonl", [""])
    with pytest.raises(UserError) as info:
        read_rows([empty])
    assert empty in str(info.value) and "no rows" in str(info.value)


# -- tokenize_row ------------------------------------------------------------------------------------

def labelled_spans(ex: Example) -> list[list[int]]:
    spans, cur = [], []
    for tok, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE_INDEX:
            assert lab == tok, "a label is the token at the same position (the model shifts)"
            cur.append(tok)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return spans


def test_labels_only_on_assistant_tokens(tokenizer: Any) -> None:
    row = chat(
        ("system", "Du er en hjelpsom assistent."),
        ("user", "Hva heter hovedstaden i Norge?"),
        ("assistant", "Oslo er hovedstaden."),
        ("user", "Og i Sverige?"),
        ("assistant", "Stockholm, ved Mälaren."),
    )
    ex = tokenize_row(row, tokenizer, max_seq_len=1024)
    assert len(ex.input_ids) == len(ex.labels)
    assert ex.input_ids == list(tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False))
    spans = labelled_spans(ex)
    assert [tokenizer.decode(s, skip_special_tokens=True).strip() for s in spans] == [
        "Oslo er hovedstaden.", "Stockholm, ved Mälaren.",
    ]
    # each reply ends with end-of-sequence, so the model learns to stop
    assert all(s[-1] == tokenizer.eos_token_id for s in spans)
    # nothing of the system prompt or the user turns is learned
    unlabelled = [t for t, lab in zip(ex.input_ids, ex.labels) if lab == IGNORE_INDEX]
    text = tokenizer.decode(unlabelled, skip_special_tokens=True)
    assert "Hva heter hovedstaden" in text and "Oslo" not in text and "Stockholm" not in text


@pytest.mark.parametrize("row", [json.loads(line) for line in SFT_SAMPLE.read_text().splitlines()[:5] if line.strip()])
def test_labels_on_shipped_rows(tokenizer: Any, row: dict[str, Any]) -> None:
    ex = tokenize_row(row, tokenizer, max_seq_len=4096)
    replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    decoded = [tokenizer.decode(s, skip_special_tokens=True).strip() for s in labelled_spans(ex)]
    assert decoded == [r.strip() for r in replies]


def test_truncates_to_max_seq_len(tokenizer: Any) -> None:
    row = chat(("user", "Fortell en lang historie om fjorder. " * 5), ("assistant", "Det var en gang " * 40))
    full = tokenize_row(row, tokenizer, max_seq_len=10_000)
    assert len(full.input_ids) > 64
    for max_len in (9, 20, 64):
        ex = tokenize_row(row, tokenizer, max_seq_len=max_len)
        assert len(ex.input_ids) == len(ex.labels) == max_len
        assert ex.input_ids == full.input_ids[:max_len] and ex.labels == full.labels[:max_len]
    prompt_len = next(i for i, lab in enumerate(full.labels) if lab != IGNORE_INDEX)
    cut = tokenize_row(row, tokenizer, max_seq_len=prompt_len)
    assert all(lab == IGNORE_INDEX for lab in cut.labels), "a cut inside the prompt leaves nothing to learn"


def test_without_chat_template_every_token_is_learned(tokenizer: Any) -> None:
    ex = tokenize_row(GOOD, tokenizer, max_seq_len=6, chat_template=False)
    assert ex.labels == ex.input_ids and len(ex.input_ids) <= 6


# -- epoch_batches -----------------------------------------------------------------------------------

PAD = 0


def examples(num: int) -> list[Example]:
    # row i is identifiable from its first token; lengths vary so padding is exercised
    return [Example([1000 + i] + [7] * (i % 4), [IGNORE_INDEX] + [7] * (i % 4)) for i in range(num)]


def rows_of(batches: list[dict[str, list[list[int]]]]) -> list[int]:
    return [seq[0] - 1000 for b in batches for seq in b["input_ids"]]


def run_epoch(exs: list[Example], *, batch_size: int, world_size: int, epoch: int, seed: int = 0) -> list[list[dict]]:
    return [
        list(epoch_batches(exs, batch_size=batch_size, rank=r, world_size=world_size, epoch=epoch, seed=seed,
                           pad_id=PAD))
        for r in range(world_size)
    ]


@pytest.mark.parametrize(("num", "batch_size", "world_size"), [(43, 2, 3), (40, 4, 2), (7, 1, 7), (10, 3, 1)])
def test_same_number_of_batches_and_disjoint_rows(num: int, batch_size: int, world_size: int) -> None:
    exs = examples(num)
    per_rank = run_epoch(exs, batch_size=batch_size, world_size=world_size, epoch=0)
    expected_steps = steps_per_epoch(num, batch_size=batch_size, world_size=world_size)
    assert expected_steps == num // (batch_size * world_size)
    assert [len(b) for b in per_rank] == [expected_steps] * world_size
    assert all(len(batch["input_ids"]) == batch_size for batches in per_rank for batch in batches)
    seen = [rows_of(b) for b in per_rank]
    flat = [i for rows in seen for i in rows]
    assert len(flat) == len(set(flat)) == expected_steps * batch_size * world_size, "ranks must not share rows"
    assert set(flat) <= set(range(num))


def test_batches_are_padded_and_masked() -> None:
    exs = examples(8)
    for batch in run_epoch(exs, batch_size=4, world_size=1, epoch=0)[0]:
        width = max(len(exs[s[0] - 1000].input_ids) for s in batch["input_ids"])
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            ex = exs[ids[0] - 1000]
            real = len(ex.input_ids)
            assert len(ids) == len(labels) == len(mask) == width
            assert ids == ex.input_ids + [PAD] * (width - real)
            assert labels == ex.labels + [IGNORE_INDEX] * (width - real)
            assert mask == [1] * real + [0] * (width - real)


def test_order_changes_per_epoch_and_is_reproducible() -> None:
    exs = examples(40)
    orders = [[rows_of(b) for b in run_epoch(exs, batch_size=2, world_size=2, epoch=e)] for e in range(3)]
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    assert orders[0] == [rows_of(b) for b in run_epoch(exs, batch_size=2, world_size=2, epoch=0)]
    other_seed = [rows_of(b) for b in run_epoch(exs, batch_size=2, world_size=2, epoch=0, seed=1)]
    assert other_seed != orders[0]
    # with no rows dropped, every epoch covers every row exactly once
    for per_rank in orders:
        assert Counter(i for rows in per_rank for i in rows) == Counter(range(40))


def test_rows_dropped_at_the_end_differ_per_epoch() -> None:
    exs = examples(10)  # 2 workers x 4 = 8 per step: 2 rows dropped each epoch
    covered = set()
    for epoch in range(6):
        covered |= {i for rows in map(rows_of, run_epoch(exs, batch_size=4, world_size=2, epoch=epoch)) for i in rows}
    assert covered == set(range(10)), "no row may be dropped in every epoch"


@pytest.mark.parametrize(("num", "batch_size", "world_size"), [(3, 2, 2), (0, 1, 1), (6, 7, 1)])
def test_too_few_rows_for_one_step(num: int, batch_size: int, world_size: int) -> None:
    with pytest.raises(UserError) as info:
        list(epoch_batches(examples(num), batch_size=batch_size, rank=0, world_size=world_size, epoch=0, seed=0,
                           pad_id=PAD))
    msg = str(info.value)
    assert f"{num} training rows" in msg and f"{world_size} workers" in msg and f"micro_batch_size {batch_size}" in msg
