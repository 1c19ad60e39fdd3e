"""Instruction data: chat rows -> token ids with a loss mask on assistant turns only."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from fjordtune.errors import UserError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken


def read_rows(paths: Sequence[str], *, store: Any = None) -> list[dict[str, Any]]:
    """Read JSON-lines chat rows from local paths or s3:// URIs, checking each row's shape."""
    rows = []
    for path in paths:
        if path.startswith("s3://"):
            if store is None:
                from fjordtune.storage import Store

                store = Store()
            text = store.read_bytes(path).decode("utf-8")
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except FileNotFoundError:
                raise UserError(f"data.train_files: {path}: no such file") from None
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            msgs = row.get("messages") if isinstance(row, dict) else None
            if not (isinstance(msgs, list) and msgs and all(_is_msg(m) for m in msgs)):
                raise UserError(f"{path}:{lineno}: expected {{\"messages\": [{{\"role\", \"content\"}}, ...]}}")
            if not any(m["role"] == "assistant" for m in msgs):
                raise UserError(f"{path}:{lineno}: no assistant turn, so nothing to learn from")
            rows.append(row)
    if not rows:
        raise UserError(f"data.train_files: {', '.join(paths)}: no rows")
    return rows


def tokenize_row(row: dict[str, Any], tokenizer: Any, *, max_seq_len: int, chat_template: bool = True) -> Example:
    """Token ids of a conversation, with labels only on the assistant replies.

    Assistant spans are found by rendering growing prefixes of the conversation, which is exact for
    templates whose rendering of a prefix is a prefix of the whole (Mistral, ChatML, Llama 3).
    """
    msgs = row["messages"]
    if not chat_template:
        text = "\n".join(m["content"] for m in msgs)
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_seq_len]
        return Example(ids, list(ids))

    def render(upto: int, gen: bool) -> list[int]:
        return list(
            tokenizer.apply_chat_template(msgs[:upto], tokenize=True, add_generation_prompt=gen, return_dict=False)
        )

    ids = render(len(msgs), False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start, end = len(render(i, True)), len(render(i + 1, False))
        if ids[:end] != render(i + 1, False):
            raise UserError("the tokenizer's chat template does not render prefixes stably; set data.chat_template: false")
        labels[start:end] = ids[start:end]
    return Example(ids[:max_seq_len], labels[:max_seq_len])


def epoch_batches(
    examples: Sequence[Example], *, batch_size: int, rank: int, world_size: int, epoch: int, seed: int, pad_id: int
) -> Iterator[dict[str, list[list[int]]]]:
    """This rank's padded batches of one epoch. Every rank gets the same number of batches (the
    shuffled order is cut to a multiple of world_size * batch_size) so collectives stay in step."""
    order = list(range(len(examples)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    per_step = world_size * batch_size
    usable = len(order) - len(order) % per_step
    if usable == 0:
        raise UserError(
            f"{len(examples)} training rows are fewer than one step needs "
            f"({world_size} workers x micro_batch_size {batch_size})"
        )
    for start in range(0, usable, per_step):
        chunk = order[start + rank * batch_size : start + (rank + 1) * batch_size]
        yield collate([examples[i] for i in chunk], pad_id=pad_id)


def steps_per_epoch(num_examples: int, *, batch_size: int, world_size: int) -> int:
    return num_examples // (batch_size * world_size)


def collate(batch: Sequence[Example], *, pad_id: int) -> dict[str, list[list[int]]]:
    width = max(len(e.input_ids) for e in batch)
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
    for e in batch:
        pad = width - len(e.input_ids)
        out["input_ids"].append(e.input_ids + [pad_id] * pad)
        out["labels"].append(e.labels + [IGNORE_INDEX] * pad)
        out["attention_mask"].append([1] * len(e.input_ids) + [0] * pad)
    return out


def _is_msg(m: Any) -> bool:
    return isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
