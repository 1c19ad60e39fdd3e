"""`fjordtune.data.sft`: reading chat rows, loss masks on assistant turns, and per-rank epoch batches.

Unit tier, with the real tokenizer shipped in `fjordtune/assets/tokenizer` (no download).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fjordtune.data.sft import (
    IGNORE_INDEX,
    Example,
    collate,
    epoch_batches,
    eval_batches,
    fit_length,
    read_rows,
    split_eval,
    step_batches,
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
        ('{"messages": [{"role": "narrator", "content": "x"}]}', "role 'narrator' is not system, user or assistant"),
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
    assert tokenize_row(row, tokenizer, max_seq_len=None) == full, "None: the whole conversation"
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


def test_too_few_rows_names_grad_accum() -> None:
    with pytest.raises(UserError) as info:
        list(step_batches(examples(7), batch_size=2, rank=0, world_size=2, epoch=0, seed=0, pad_id=PAD, accum=2))
    msg = str(info.value)
    assert "7 training rows" in msg and "train.grad_accum_steps 2" in msg


# -- step_batches ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("num", "batch_size", "world_size", "accum"), [(43, 2, 3, 2), (40, 4, 2, 1), (17, 1, 2, 4),
                                                                       (30, 3, 1, 3)])
def test_step_batches_layout(num: int, batch_size: int, world_size: int, accum: int) -> None:
    exs = examples(num)
    per_rank = [list(step_batches(exs, batch_size=batch_size, rank=r, world_size=world_size, epoch=1, seed=3,
                                  pad_id=PAD, accum=accum)) for r in range(world_size)]
    num_steps = steps_per_epoch(num, batch_size=batch_size, world_size=world_size, accum=accum)
    assert num_steps == num // (batch_size * world_size * accum) > 0
    assert [len(steps) for steps in per_rank] == [num_steps] * world_size, "every rank takes the same steps"
    order = list(range(num))
    random.Random(3 * 1000 + 1).shuffle(order)  # the epoch shuffle `epoch_batches` always had
    per_step = world_size * batch_size * accum
    for r, steps in enumerate(per_rank):
        for s, micros in enumerate(steps):
            assert len(micros) == accum
            for m, batch in enumerate(micros):
                first = s * per_step + (m * world_size + r) * batch_size
                assert rows_of([batch]) == order[first : first + batch_size]
    flat = [i for steps in per_rank for micros in steps for i in rows_of(micros)]
    assert len(flat) == len(set(flat)) == num_steps * per_step, "each row at most once per epoch"


def test_epoch_batches_is_step_batches_without_accumulation() -> None:
    exs = examples(23)
    for rank in range(2):
        kw = dict(batch_size=3, rank=rank, world_size=2, epoch=2, seed=5, pad_id=PAD)
        assert [[b] for b in epoch_batches(exs, **kw)] == list(step_batches(exs, **kw))


# -- collate -----------------------------------------------------------------------------------------

def test_collate_lengths_and_pack_padding() -> None:
    plain = collate([Example([5, 6, 7], [IGNORE_INDEX, 6, 7]), Example([8], [8])], pad_id=PAD)
    assert plain == {
        "input_ids": [[5, 6, 7], [8, PAD, PAD]],
        "labels": [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]],
        "attention_mask": [[1, 1, 1], [1, 0, 0]],
        "lengths": [3, 1],
    }
    packs = [Example([5, 6, 7, 8], [IGNORE_INDEX, 6, IGNORE_INDEX, 8], [0, 1, 0, 1]),
             Example([9, 4], [IGNORE_INDEX, 4], [0, 1])]
    packed = collate(packs, pad_id=PAD)
    assert "attention_mask" not in packed, "transformers detects packing only without an attention mask"
    assert packed == {
        "input_ids": [[5, 6, 7, 8], [9, 4, PAD, PAD]],
        "labels": [[IGNORE_INDEX, 6, IGNORE_INDEX, 8], [IGNORE_INDEX, 4, IGNORE_INDEX, IGNORE_INDEX]],
        "position_ids": [[0, 1, 0, 1], [0, 1, 0, 1]],  # the padding is a segment of its own
        "lengths": [4, 2],
    }


# -- fit_length --------------------------------------------------------------------------------------

def sized(n: int, *, labelled_from: int) -> Example:
    return Example(list(range(1, n + 1)), [IGNORE_INDEX] * labelled_from + list(range(labelled_from + 1, n + 1)))


FIT_ROWS = [sized(10, labelled_from=2), sized(20, labelled_from=15), sized(5, labelled_from=1),
            sized(30, labelled_from=3)]  # 65 tokens; rows 1 and 3 are longer than 12


def test_fit_length_truncate() -> None:
    kept, report = fit_length(FIT_ROWS, max_seq_len=12, truncation="truncate")
    assert kept == [FIT_ROWS[0], FIT_ROWS[2], Example(FIT_ROWS[3].input_ids[:12], FIT_ROWS[3].labels[:12])]
    assert (report.rows, report.too_long, report.longest, report.kept, report.dropped, report.label_free,
            report.tokens_cut, report.max_seq_len, report.policy) == (4, 2, 30, 3, 1, 1, 8 + 18, 12, "truncate")
    text = "\n".join(report.lines())
    assert report.lines()[0] == "2 of 4 rows are longer than data.max_seq_len=12 tokens (longest 30)"
    assert "cut 26 of 65 tokens (40.0%)" in text
    assert "data.truncation=drop would instead leave those 2 rows out (50 tokens, 76.9%)" in text
    assert "1 rows with no assistant token" in text and "training on 3 of 4 rows" in text


def test_fit_length_drop() -> None:
    kept, report = fit_length(FIT_ROWS, max_seq_len=12, truncation="drop")
    assert kept == [FIT_ROWS[0], FIT_ROWS[2]]
    assert (report.too_long, report.kept, report.dropped, report.label_free, report.tokens_cut,
            report.policy) == (2, 2, 2, 0, 0, "drop")
    text = "\n".join(report.lines())
    assert "data.truncation=drop: left out 2 rows (50 of 65 tokens, 76.9%)" in text
    assert "data.truncation=truncate would instead keep them cut to 12 tokens, losing 26 tokens (40.0%)" in text
    assert "training on 2 of 4 rows" in text


def test_fit_length_nothing_too_long_is_one_line() -> None:
    for policy in ("truncate", "drop"):
        kept, report = fit_length(FIT_ROWS, max_seq_len=30, truncation=policy)
        assert kept == FIT_ROWS and report.dropped == report.too_long == report.tokens_cut == 0
        assert report.lines() == ["all 4 rows fit in data.max_seq_len=30 tokens (longest 30)"]


def test_fit_length_label_free_rows_are_dropped_either_way() -> None:
    only_first = Example([1, 2, 3], [1, IGNORE_INDEX, IGNORE_INDEX])
    rows = [sized(6, labelled_from=6), only_first, sized(6, labelled_from=2)]
    assert [e.num_labels for e in rows] == [0, 0, 4], "labels[0] never counts: the loss shifts by one"
    for policy in ("truncate", "drop"):
        kept, report = fit_length(rows, max_seq_len=8, truncation=policy)
        assert kept == rows[2:] and report.label_free == report.dropped == 2


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_fit_length_nothing_left(policy: str) -> None:
    with pytest.raises(UserError) as info:
        fit_length([sized(20, labelled_from=15), sized(30, labelled_from=25)], max_seq_len=12, truncation=policy)
    msg = str(info.value)
    assert "data.max_seq_len=12" in msg and "data.truncation" in msg and "no training rows left" in msg
    with pytest.raises(UserError, match="data.truncation"):
        fit_length(FIT_ROWS, max_seq_len=12, truncation="cut")


# -- held-out data -----------------------------------------------------------------------------------

def test_split_eval() -> None:
    rows = [{"id": i} for i in range(50)]
    train, held = split_eval(rows, fraction=0.1, seed=7)
    assert (train, held) == split_eval(rows, fraction=0.1, seed=7), "a fixed split"
    assert len(held) == 5 and len(train) == 45
    assert sorted(r["id"] for r in train + held) == list(range(50))
    assert train == sorted(train, key=lambda r: r["id"]) and held == sorted(held, key=lambda r: r["id"])
    assert held != split_eval(rows, fraction=0.1, seed=8)[1]
    assert len(split_eval(rows, fraction=0.001, seed=0)[1]) == 1, "at least one held-out row"
    assert split_eval(rows, fraction=0.0, seed=0) == (rows, [])
    with pytest.raises(UserError, match="data.eval_fraction"):
        split_eval(rows[:1], fraction=0.5, seed=0)


@pytest.mark.parametrize(("num", "batch_size", "world_size"), [(10, 3, 2), (7, 2, 4), (3, 4, 5), (8, 2, 2), (1, 1, 3)])
@pytest.mark.parametrize("packed", [False, True])
def test_eval_batches_score_every_example_once(num: int, batch_size: int, world_size: int, packed: bool) -> None:
    exs = examples(num)
    if packed:
        exs = [Example(e.input_ids, e.labels, list(range(len(e.input_ids)))) for e in exs]
    per_rank = [eval_batches(exs, batch_size=batch_size, rank=r, world_size=world_size, pad_id=PAD)
                for r in range(world_size)]
    assert len({len(b) for b in per_rank}) == 1, "every rank runs the same number of forwards"
    scored = []
    for batches in per_rank:
        for batch in batches:
            assert 0 < len(batch["input_ids"]) <= batch_size
            assert ("position_ids" in batch) == packed and ("attention_mask" in batch) != packed
            for ids, labels, length in zip(batch["input_ids"], batch["labels"], batch["lengths"]):
                if ids[0] == PAD:  # a filler row: nothing in the loss
                    assert length == 1 and all(lab == IGNORE_INDEX for lab in labels)
                else:
                    scored.append(ids[0] - 1000)
    assert Counter(scored) == Counter(range(num)), "every held-out example scored exactly once"
