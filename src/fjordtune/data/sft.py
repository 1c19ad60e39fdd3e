"""Instruction data: chat rows -> token ids with a loss mask on assistant turns only, then length fitting,
packing, per-rank step batches and held-out batches."""

from __future__ import annotations

import gc
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from fjordtune.errors import InternalError, UserError

IGNORE_INDEX = -100
TRUNCATION_POLICIES = ("truncate", "drop")


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    position_ids: list[int] | None = None  # set on packs only: restarts at 0 for each packed example

    @property
    def num_labels(self) -> int:
        """Tokens that count in the loss: the loss shifts by one, so labels[0] never does."""
        return sum(1 for lab in self.labels[1:] if lab != IGNORE_INDEX)


def read_rows(paths: Sequence[str], *, store: Any = None, key: str = "data.train_files") -> list[dict[str, Any]]:
    """Every chat row of JSON-lines or Parquet files (local or s3://) in memory, each checked: for tests and
    Ray-free tools (a GPU check) at small size. Jobs plan their data with `data.mixture` instead, which never
    holds the rows. Errors name the job key `key` the paths came from, or the file and line."""
    from fjordtune.config.schema import DataSource
    from fjordtune.data.sources import iter_source

    if store is None:
        from fjordtune.storage import Store

        store = Store()
    rows = [r.row for path in paths for r in iter_source(DataSource(path=path), store=store, key=key)]
    if not rows:
        raise UserError(f"{key}: {', '.join(paths)}: no rows")
    return rows


def tokenize_row(row: dict[str, Any], tokenizer: Any, *, max_seq_len: int | None,
                 chat_template: bool = True) -> Example:
    """Token ids of a conversation, with labels only on the assistant replies; cut to `max_seq_len` tokens
    (None: the whole conversation, to be fitted later by `fit_length`, which counts what it cuts).

    Assistant spans are found by rendering growing prefixes of the conversation, which is exact for
    templates whose rendering of a prefix is a prefix of the whole (Mistral, ChatML, Llama 3).
    """
    msgs = row["messages"]
    if not chat_template:
        text = "\n".join(m["content"] for m in msgs)
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"][:max_seq_len])
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


# -- length fitting ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LengthReport:
    """What `fit_length` did to rows longer than `max_seq_len`. `kept + dropped == rows`; `dropped`
    includes the `label_free` rows (no label token left, under either policy)."""

    rows: int
    too_long: int
    longest: int
    kept: int
    dropped: int
    label_free: int
    tokens_cut: int  # tokens truncation cut off (also from rows then dropped as label-free); 0 under `drop`
    max_seq_len: int
    policy: str  # "drop" | "truncate"
    num_tokens: int = 0  # tokens of all rows before fitting
    too_long_tokens: int = 0  # tokens of the rows longer than max_seq_len, before fitting

    def lines(self) -> list[str]:
        """The log lines shown before training: what was too long, what the policy did, what the other
        policy would do."""
        limit = f"data.max_seq_len={self.max_seq_len}"
        if not self.too_long:
            out = [f"all {self.rows} rows fit in {limit} tokens (longest {self.longest})"]
        else:
            out = [f"{self.too_long} of {self.rows} rows are longer than {limit} tokens (longest {self.longest})"]
            beyond = self.too_long_tokens - self.too_long * self.max_seq_len  # what truncation cuts
            if self.policy == "truncate":
                out.append(f"data.truncation=truncate: cut {self.tokens_cut} of {self.num_tokens} tokens "
                           f"({_share(self.tokens_cut, self.num_tokens)}) from {self.too_long} rows")
                out.append(f"data.truncation=drop would instead leave those {self.too_long} rows out "
                           f"({self.too_long_tokens} tokens, {_share(self.too_long_tokens, self.num_tokens)})")
            else:
                out.append(f"data.truncation=drop: left out {self.too_long} rows ({self.too_long_tokens} of "
                           f"{self.num_tokens} tokens, {_share(self.too_long_tokens, self.num_tokens)})")
                out.append(f"data.truncation=truncate would instead keep them cut to {self.max_seq_len} tokens, "
                           f"losing {beyond} tokens ({_share(beyond, self.num_tokens)})")
        if self.label_free:
            out.append(f"{self.label_free} rows with no assistant token left in the loss were dropped")
        if self.dropped:
            out.append(f"training on {self.kept} of {self.rows} rows")
        return out


def fit_length(examples: Sequence[Example], *, max_seq_len: int,
               truncation: str) -> tuple[list[Example], LengthReport]:
    """Fit untruncated examples to `max_seq_len` under `truncation` ("truncate" | "drop"), counting what
    that costs. Rows with no label token left are dropped either way: they teach nothing."""
    if truncation not in TRUNCATION_POLICIES:
        raise UserError(f"data.truncation: {truncation!r}: expected one of {', '.join(TRUNCATION_POLICIES)}")
    kept: list[Example] = []
    too_long = label_free = tokens_cut = too_long_tokens = 0
    for ex in examples:
        n = len(ex.input_ids)
        fitted, cut = fit_one(ex, max_seq_len=max_seq_len, truncation=truncation)
        if n > max_seq_len:
            too_long += 1
            too_long_tokens += n
            tokens_cut += cut
        if fitted is None:
            label_free += n <= max_seq_len or truncation == "truncate"
            continue
        kept.append(fitted)
    report = LengthReport(
        rows=len(examples), too_long=too_long, longest=max((len(e.input_ids) for e in examples), default=0),
        kept=len(kept), dropped=len(examples) - len(kept), label_free=label_free, tokens_cut=tokens_cut,
        max_seq_len=max_seq_len, policy=truncation, num_tokens=sum(len(e.input_ids) for e in examples),
        too_long_tokens=too_long_tokens,
    )
    if not kept:
        raise UserError(
            f"no training rows left: of {len(examples)} rows, {too_long} are longer than "
            f"data.max_seq_len={max_seq_len} and {label_free} have no assistant token within it "
            f"(data.truncation={truncation}); raise data.max_seq_len"
            + (" or set data.truncation=truncate" if truncation == "drop" else "")
        )
    return kept, report


def fit_one(ex: Example, *, max_seq_len: int, truncation: str) -> tuple[Example | None, int]:
    """One example fitted to `max_seq_len` under `truncation`: (the example, or None when it is left out,
    and the tokens truncation cut). Left out: too long under `drop`, or no label token left either way."""
    n = len(ex.input_ids)
    cut = 0
    if n > max_seq_len:
        if truncation == "drop":
            return None, 0
        cut = n - max_seq_len
        ex = Example(ex.input_ids[:max_seq_len], ex.labels[:max_seq_len])
    return (ex if ex.num_labels else None), cut


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "0.0%"


# -- packing -----------------------------------------------------------------------------------------

def pack(examples: Sequence[Example], *, max_seq_len: int) -> list[Example]:
    """Whole examples concatenated into sequences of at most `max_seq_len` tokens, by first-fit decreasing
    (longest first, ties by index; each goes to the first pack it fits in). Position ids restart at 0 for
    each example, and each example's first label is ignored: the previous example's last token must not
    learn to predict it. With position ids and no attention mask, transformers keeps attention within
    each example (`masking_utils.find_packed_sequence_indices`)."""
    lengths = [len(e.input_ids) for e in examples]
    if any(n > max_seq_len or n == 0 for n in lengths):
        raise InternalError(f"pack: examples must hold 1..{max_seq_len} tokens (fit_length first); "
                            f"got lengths {min(lengths)}..{max(lengths)}")
    if not examples:
        return []
    # Max-segment tree over bin capacities; unopened bins hold max_seq_len, so the leftmost leaf that fits
    # is the first open bin that fits or else the next new one: O(n log n), not O(n * bins).
    size = 1 << (len(examples) - 1).bit_length()
    free = [max_seq_len] * (2 * size)
    bins: list[list[int]] = []
    for i in sorted(range(len(examples)), key=lambda i: (-lengths[i], i)):
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= lengths[i] else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        free[node] -= lengths[i]
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    arange = list(range(max_seq_len))
    # The packs are thousands of long int lists: a cyclic GC pass would walk every element of every young
    # list (2-3x the whole packing time) and find no cycle, so it is paused while they are built.
    paused = gc.isenabled()
    gc.disable()
    try:
        return [_concat([examples[i] for i in members], arange) for members in bins]
    finally:
        if paused:
            gc.enable()


def _concat(members: Sequence[Example], arange: list[int]) -> Example:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for e in members:
        labels += e.labels
        labels[len(ids)] = IGNORE_INDEX
        ids += e.input_ids
        positions += arange[: len(e.input_ids)]
    return Example(ids, labels, positions)


# -- batches -----------------------------------------------------------------------------------------

def collate(batch: Sequence[Example], *, pad_id: int) -> dict[str, list[Any]]:
    """Right-padded lists: `input_ids`, `labels`, `lengths` (real tokens per row) and `attention_mask`,
    or, for packs, `position_ids` instead of `attention_mask` (transformers detects packed sequences from
    position ids only when there is no attention mask). A pack row's padding restarts its positions at 0,
    so it is a segment of its own."""
    width = max(len(e.input_ids) for e in batch)
    packed = any(e.position_ids is not None for e in batch)
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "position_ids" if packed else "attention_mask": []}
    for e in batch:
        real = len(e.input_ids)
        pad = width - real
        out["input_ids"].append(e.input_ids + [pad_id] * pad)
        out["labels"].append(e.labels + [IGNORE_INDEX] * pad)
        if packed:
            positions = e.position_ids if e.position_ids is not None else list(range(real))
            out["position_ids"].append(positions + list(range(pad)))
        else:
            out["attention_mask"].append([1] * real + [0] * pad)
    out["lengths"] = [len(e.input_ids) for e in batch]
    return out


def step_batches(
    items: Sequence[Example], *, batch_size: int, rank: int, world_size: int, epoch: int, seed: int, pad_id: int,
    accum: int = 1,
) -> Iterator[list[dict[str, list[Any]]]]:
    """Per optimizer step, this rank's `accum` collated micro-batches of one epoch. The shuffled order is
    cut into steps of world_size * batch_size * accum items (the rest is dropped, a different rest each
    epoch), so every rank takes the same number of steps and collectives stay in step."""
    for step in _step_indices(len(items), batch_size=batch_size, world_size=world_size, epoch=epoch, seed=seed,
                              accum=accum, ranks=(rank,)):
        yield [collate([items[i] for i in micro], pad_id=pad_id) for micro in step[0]]


def epoch_batches(
    examples: Sequence[Example], *, batch_size: int, rank: int, world_size: int, epoch: int, seed: int, pad_id: int
) -> Iterator[dict[str, list[Any]]]:
    """This rank's padded batches of one epoch: `step_batches` without gradient accumulation."""
    for (batch,) in step_batches(examples, batch_size=batch_size, rank=rank, world_size=world_size, epoch=epoch,
                                 seed=seed, pad_id=pad_id):
        yield batch


def steps_per_epoch(num_examples: int, *, batch_size: int, world_size: int, accum: int = 1) -> int:
    return num_examples // (batch_size * world_size * accum)


def token_efficiency(items: Sequence[Example], *, batch_size: int, world_size: int, seed: int, epoch: int = 0,
                     accum: int = 1) -> tuple[int, int]:
    """(real tokens, token slots including padding) over one epoch's batches of every rank, laid out as
    `step_batches` lays them out."""
    real = slots = 0
    for step in _step_indices(len(items), batch_size=batch_size, world_size=world_size, epoch=epoch, seed=seed,
                              accum=accum, ranks=range(world_size)):
        for micros in step:
            for micro in micros:
                lengths = [len(items[i].input_ids) for i in micro]
                real += sum(lengths)
                slots += max(lengths) * len(lengths)
    return real, slots


def _step_indices(num_items: int, *, batch_size: int, world_size: int, epoch: int, seed: int, accum: int,
                  ranks: Sequence[int]) -> Iterator[list[list[list[int]]]]:
    """Per step, per rank in `ranks`, the item indices of each micro-batch: micro-batch m of rank r takes
    the step's items [(m * world_size + r) * batch_size, + batch_size)."""
    order = list(range(num_items))
    random.Random(seed * 1000 + epoch).shuffle(order)
    per_step = world_size * batch_size * accum
    usable = num_items - num_items % per_step
    if usable == 0:
        raise UserError(
            f"{num_items} training rows are fewer than one step needs ({world_size} workers x micro_batch_size "
            f"{batch_size} x train.grad_accum_steps {accum})"
        )
    for start in range(0, usable, per_step):
        firsts = [[start + (m * world_size + r) * batch_size for m in range(accum)] for r in ranks]
        yield [[order[a : a + batch_size] for a in rank_firsts] for rank_firsts in firsts]


# -- held-out data -----------------------------------------------------------------------------------

def split_eval(rows: Sequence[Any], *, fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A fixed random (train, eval) split of `rows`, each part in the original order; at least one eval row
    when `fraction` > 0."""
    if not 0 <= fraction < 1:
        raise UserError(f"data.eval_fraction={fraction}: expected a fraction in [0, 1)")
    num_eval = max(1, round(fraction * len(rows))) if fraction > 0 else 0
    if num_eval >= len(rows):
        raise UserError(f"data.eval_fraction={fraction} holds out {num_eval} of {len(rows)} rows, leaving none to "
                        "train on; lower it or give data.eval_files")
    held = set(random.Random(seed).sample(range(len(rows)), num_eval))
    return ([r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held])


def eval_batches(examples: Sequence[Example], *, batch_size: int, rank: int, world_size: int,
                 pad_id: int, num_batches: int | None = None) -> list[dict[str, list[Any]]]:
    """This rank's batches of all held-out examples (rank r takes examples r, r + world_size, ...), so
    each is scored exactly once over all ranks. Every rank gets the same number of batches (FSDP forwards
    are collectives); a rank that runs short gets one-token filler rows with no label."""
    mine = list(examples[rank::world_size])
    if num_batches is None:  # else given: ranks holding shards of their own agree on the most any of them needs
        num_batches = math.ceil(math.ceil(len(examples) / world_size) / batch_size)
    packed = any(e.position_ids is not None for e in examples)
    filler = Example([pad_id], [IGNORE_INDEX], [0] if packed else None)
    out = []
    for b in range(num_batches):
        chunk = mine[b * batch_size : (b + 1) * batch_size] or [filler]
        out.append(collate(chunk, pad_id=pad_id))
    return out
