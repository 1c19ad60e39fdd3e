"""A deterministic training mixture, planned on the driver without holding a single row.

One streaming pass per source keeps, per valid row, only what the plan needs: two 128-bit content
digests (the messages as written, and normalised), a length-filter verdict, and where the row is (line,
byte offset and length): a few dozen bytes, so a million rows cost tens of MB, not the gigabytes the rows
would as Python objects. From those arrays, in source order:

1. de-duplication (`data.dedup`): the first occurrence across all sources wins;
2. length filters: `data.min_chars` on the assistant replies, `data.max_chars` on all messages;
3. sampling per source (`weight` or `count`) with a numpy Generator seeded by (mixture_seed, source index),
   so changing one source's settings never reshuffles another's sample.

The result is a `Plan`: a JSON manifest (what each step did to each source, content hashes, the seed),
the held-out rows (`data.eval_fraction`), and `chunks()`, small dicts from which Ray Data tasks read
their own rows (`fjordtune.data.sources.read_chunk`). Rows are read twice in all: once here, once by the
tasks that tokenize them; never on the driver in bulk.
"""

from __future__ import annotations

import hashlib
import logging
import math
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fjordtune.config.schema import DataSection, DataSource
from fjordtune.data.sources import (
    SourceRow,
    exact_digest,
    iter_source,
    normalised_digest,
    read_chunk,
    source_file,
    source_kind,
)
from fjordtune.errors import UserError

if TYPE_CHECKING:
    from fjordtune.storage import Store

log = logging.getLogger(__name__)

FIRST_BAD = 5
PROGRESS_EVERY = 100_000
OK, TOO_SHORT, TOO_LONG = 0, 1, 2
CHUNK_MAX_BYTES = 64 << 20
"""A JSON-lines chunk's ranged read covers at most this many bytes (unless one line is longer)."""
CHUNK_MAX_GAP_BYTES = 1 << 20
"""Unselected bytes between two selected lines that end a chunk: a sparse sample then reads what it takes,
not the whole file."""
CHUNK_MAX_SPAN_ROWS, CHUNK_MAX_GAP_ROWS = 50_000, 4_096  # the same two limits for Parquet and hf, in rows


class _FirstBad(list[tuple[str, int, str]]):
    """The `bad` list given to `iter_source`: counts every bad row, keeps only the first few."""

    def __init__(self) -> None:
        super().__init__()
        self.num = 0

    def append(self, item: tuple[str, int, str]) -> None:
        self.num += 1
        if len(self) < FIRST_BAD:
            super().append(item)


@dataclass
class _Scan:
    """One source's pass: per valid row, in file order, its digests, filter verdict and position."""

    read: int
    bad: _FirstBad
    exact: np.ndarray  # (rows, 2) uint64: each row's 16-byte digest, as two numbers
    normalised: np.ndarray | None  # the same, of the normalised text; empty unless dedup is normalised
    verdict: np.ndarray  # uint8: OK, TOO_SHORT or TOO_LONG
    lines: np.ndarray  # uint32
    offsets: np.ndarray  # int64, JSON lines only
    lengths: np.ndarray  # uint32, JSON lines only


@dataclass(frozen=True)
class _Selection:
    """A source's selected rows in mixture order (repeats adjacent): what chunks are cut from."""

    index: int
    source: DataSource
    first_row: int
    lines: np.ndarray  # uint32
    offsets: np.ndarray  # int64 (JSON lines; empty otherwise)
    lengths: np.ndarray  # uint32 (JSON lines; empty otherwise)
    keys: np.ndarray  # uint64: the first 8 bytes of each row's exact digest (chunk checks, held-out groups)

    @property
    def kind(self) -> str:
        return source_kind(self.source)


@dataclass
class Plan:
    """A planned mixture: the manifest, the row count, the held-out row ids, and how to read the rows."""

    manifest: dict[str, Any]
    num_rows: int
    held_out: np.ndarray  # sorted row ids held out by data.eval_fraction; empty when 0
    selections: list[_Selection] = field(default_factory=list, repr=False)

    def chunks(self, max_rows: int = 2000, *, max_bytes: int = CHUNK_MAX_BYTES) -> list[dict[str, Any]]:
        """What each Ray Data task reads, as small JSON-able dicts, in row-id order.

        A chunk is one source's run of consecutive row ids: for JSON lines one contiguous byte range
        (`start`, `end`: one ranged read), for Parquet and hf a row range (`start`, `end`, 0-based). It
        names its rows as `first_row` (row ids run on from it), `first_line` and `line_steps` (each row's
        line minus the one before: a few bytes per row, not a list of big numbers), `held` (its held-out
        row ids) and `check` (a digest of its rows' content, verified when read).
        """
        out: list[dict[str, Any]] = []
        for sel in self.selections:
            if sel.kind == "jsonl":
                pos = sel.offsets
                ends = sel.offsets + sel.lengths.astype(np.int64)
                span, gap = max_bytes, CHUNK_MAX_GAP_BYTES
            else:
                pos = sel.lines.astype(np.int64) - 1
                ends = pos + 1
                span, gap = CHUNK_MAX_SPAN_ROWS, CHUNK_MAX_GAP_ROWS
            starts = [0, *(np.flatnonzero(pos[1:] - ends[:-1] > gap) + 1).tolist(), len(pos)]
            for seg_start, seg_end in zip(starts[:-1], starts[1:]):
                i = seg_start
                while i < seg_end:
                    j = min(i + max_rows, seg_end)
                    j = i + max(1, int(np.searchsorted(ends[i:j], pos[i] + span, side="right")))
                    out.append(self._chunk(sel, i, j, int(pos[i]), int(ends[j - 1])))
                    i = j
        return out

    def _chunk(self, sel: _Selection, i: int, j: int, start: int, end: int) -> dict[str, Any]:
        lines = sel.lines[i:j].astype(np.int64)
        first_row = sel.first_row + i
        a, b = np.searchsorted(self.held_out, [first_row, first_row + (j - i)])
        return {"source": sel.source.model_dump(exclude_none=True), "index": sel.index, "kind": sel.kind,
                "file": source_file(sel.source), "start": start, "end": end, "first_line": int(lines[0]),
                "line_steps": np.diff(lines, prepend=lines[0]).tolist(), "first_row": first_row,
                "held": self.held_out[a:b].tolist(),
                "check": hashlib.blake2b(sel.keys[i:j].tobytes(), digest_size=8).hexdigest()}

    def rows(self, *, store: Store, max_rows: int = 2000) -> Iterator[tuple[int, SourceRow, bool]]:
        """Every selected row in row-id order as (row id, row, held out), read chunk by chunk: for callers
        without Ray, and tests."""
        for chunk in self.chunks(max_rows):
            held = set(chunk["held"])
            for row_id, row in read_chunk(chunk, store=store):
                yield row_id, row, row_id in held


# -- planning ------------------------------------------------------------------------------------------

def plan_mixture(data: DataSection, *, store: Store, on_row: Callable[[SourceRow], None] | None = None,
                 progress: Callable[[str], None] | None = None) -> Plan:
    """Plan the mixture of `data` (its `sources`, or `train_files` taken whole) in one pass per source.

    `on_row` sees every valid row read, before de-duplication, filters and sampling: the contamination
    check hooks in here and needs no second pass. `progress` gets one line per source and one every
    ~100k rows of a big source (default: the log).
    """
    if data.sources:
        keys = [f"data.sources[{i}].{'hf' if s.hf is not None else 'path'}" for i, s in enumerate(data.sources)]
    else:
        keys = [f"data.train_files[{i}]" for i in range(len(data.train_files))]
    plan = _plan(data.source_list, keys, seed=data.mixture_seed, dedup=data.dedup, min_chars=data.min_chars,
                 max_chars=data.max_chars, on_bad_row=data.on_bad_row, eval_fraction=data.eval_fraction,
                 shuffle_seed=data.shuffle_seed, on_row=on_row, progress=progress, store=store)
    if not plan.num_rows:
        raise UserError("data: the mixture has no rows left after de-duplication, filters and sampling (see the "
                        "counts above); check data.sources, data.min_chars and data.max_chars")
    return plan


def plan_files(paths: list[str], *, key: str, store: Store, on_bad_row: str = "error",
               progress: Callable[[str], None] | None = None) -> Plan:
    """Every row of `paths` once, in file order: no de-duplication, filters or sampling (for
    `data.eval_files`, whose rows are measured as they are)."""
    plan = _plan([DataSource(path=p) for p in paths], [f"{key}[{i}]" for i in range(len(paths))], seed=0,
                 dedup="none", min_chars=0, max_chars=None, on_bad_row=on_bad_row, eval_fraction=0.0,
                 shuffle_seed=0, on_row=None, progress=progress, store=store)
    if not plan.num_rows:
        raise UserError(f"{key}: {', '.join(paths)}: no rows")
    return plan


def _plan(sources: list[DataSource], keys: list[str], *, seed: int, dedup: str, min_chars: int,
          max_chars: int | None, on_bad_row: str, eval_fraction: float, shuffle_seed: int,
          on_row: Callable[[SourceRow], None] | None, progress: Callable[[str], None] | None,
          store: Store) -> Plan:
    say = progress or log.info
    seen_exact = np.empty((0, 2), np.uint64)
    seen_normalised = np.empty((0, 2), np.uint64)
    selections: list[_Selection] = []
    entries: list[dict[str, Any]] = []
    content = hashlib.sha256()
    num_rows = 0
    for index, (src, key) in enumerate(zip(sources, keys)):
        scan = _scan(src, key=key, store=store, on_bad_row=on_bad_row, dedup=dedup, min_chars=min_chars,
                     max_chars=max_chars, on_row=on_row, say=say)
        keep_seen = index < len(sources) - 1  # later sources compare against this one's rows
        dup_exact, dup_normalised = np.zeros(len(scan.exact), bool), np.zeros(len(scan.exact), bool)
        if dedup != "none":
            dup_exact, seen_exact = _repeats(scan.exact, seen_exact, keep_seen=keep_seen)
        if dedup == "normalised":
            assert scan.normalised is not None
            dup_normalised, seen_normalised = _repeats(scan.normalised, seen_normalised, keep_seen=keep_seen)
            dup_normalised &= ~dup_exact
        scan.normalised = None  # not needed from here on: free it before the selection is built
        fresh = ~(dup_exact | dup_normalised)
        available = np.flatnonzero(fresh & (scan.verdict == OK))
        rng = np.random.default_rng([seed % 2**63, index])
        taken = np.repeat(available, _multiplicity(len(available), _wanted(src, len(available)), rng))
        source_sha = _hash_digests(scan.exact, taken, also=content)
        selections.append(_select(index, src, scan, taken, first_row=num_rows))
        num_rows += len(taken)
        entry = _entry(src, scan, fresh=fresh, dup_exact=dup_exact, dup_normalised=dup_normalised,
                       num_available=len(available), num_taken=len(taken), sha256=source_sha.hexdigest())
        entries.append(entry)
        say(_summary(entry))
        if not len(available) and (src.count or src.weight):
            log.warning("data: %s: asks for rows (%s) but none are left after de-duplication and filters",
                        src.label, f"count {src.count}" if src.count else f"weight {src.weight:g}")
        for file, line, reason in scan.bad:
            log.warning("data: skipped bad row %s:%d: %s", file, line, reason)
        del scan
    held_out = _held_out(selections, fraction=eval_fraction, seed=shuffle_seed)
    manifest = {"seed": seed, "dedup": dedup, "filters": {"min_chars": min_chars, "max_chars": max_chars},
                "on_bad_row": on_bad_row, "rows": num_rows, "held_out": len(held_out),
                "content_sha256": content.hexdigest(), "sources": entries}
    return Plan(manifest, num_rows, held_out, selections)


def _hash_digests(digests: np.ndarray, taken: np.ndarray, *, also: Any) -> Any:
    """sha256 over the digests of the taken rows in order (also fed into `also`, the mixture's hash), in
    slices: no copy of every digest at once."""
    h = hashlib.sha256()
    for a in range(0, len(taken), 1 << 16):
        block = digests[taken[a : a + (1 << 16)]].tobytes()
        h.update(block)
        also.update(block)
    return h


def _select(index: int, src: DataSource, scan: _Scan, taken: np.ndarray, *, first_row: int) -> _Selection:
    jsonl = source_kind(src) == "jsonl"
    return _Selection(index, src, first_row, scan.lines[taken],
                      scan.offsets[taken] if jsonl else np.empty(0, np.int64),
                      scan.lengths[taken] if jsonl else np.empty(0, np.uint32), scan.exact[taken, 0])


def _scan(src: DataSource, *, key: str, store: Store, on_bad_row: str, dedup: str, min_chars: int,
          max_chars: int | None, on_row: Callable[[SourceRow], None] | None, say: Callable[[str], None]) -> _Scan:
    """The one pass over a source. Columns grow as compact C arrays (`array`, `bytearray`) and become numpy
    arrays without a copy: no Python object per row survives its iteration."""
    exact, normalised, verdict = bytearray(), bytearray(), bytearray()
    lines, offsets, lengths = array("I"), array("q"), array("I")
    jsonl = source_kind(src) == "jsonl"
    bad = _FirstBad()
    num_valid = 0
    for sr in iter_source(src, store=store, key=key, on_bad_row=on_bad_row, bad=bad):
        if on_row is not None:
            on_row(sr)
        msgs = sr.row["messages"]
        exact += exact_digest(msgs)
        if dedup == "normalised":
            normalised += normalised_digest(msgs)
        num_assistant = num_all = 0
        for m in msgs:
            num_all += len(m["content"])
            if m["role"] == "assistant":
                num_assistant += len(m["content"])
        verdict.append(TOO_SHORT if num_assistant < min_chars else
                       TOO_LONG if max_chars is not None and num_all > max_chars else OK)
        lines.append(sr.line)
        if jsonl:
            offsets.append(sr.offset)
            lengths.append(sr.length)
        num_valid += 1
        if num_valid % PROGRESS_EVERY == 0:
            say(f"data: {src.label}: {num_valid + bad.num:,} rows read so far")
    return _Scan(num_valid + bad.num, bad, _digests(exact), _digests(normalised),
                 np.frombuffer(verdict, np.uint8), np.frombuffer(lines, np.uint32),
                 np.frombuffer(offsets, np.int64), np.frombuffer(lengths, np.uint32))


def _digests(buf: bytearray) -> np.ndarray:
    """16-byte digests packed in `buf` as a (rows, 2) uint64 array, without a copy: sorting two machine
    numbers is faster and needs less scratch memory than sorting 16-byte strings."""
    return np.frombuffer(buf, np.uint64).reshape(-1, 2)


def _repeats(digests: np.ndarray, seen: np.ndarray, *, keep_seen: bool) -> tuple[np.ndarray, np.ndarray]:
    """Whether each row repeats an earlier row of its source or one of `seen` (the distinct digests of the
    sources before), and `seen` with this source's distinct digests added when later sources need it.

    One stable sort of `seen` followed by this source's rows: equal digests end up adjacent in their
    original order, so every one but the first is a repeat."""
    both = np.concatenate([seen, digests]) if len(seen) else digests
    order = np.lexsort((both[:, 1], both[:, 0]))
    ordered = both[order]
    later = np.zeros(len(both), bool)
    later[1:] = (ordered[1:] == ordered[:-1]).all(axis=1)
    del ordered
    repeat = np.empty(len(both), bool)
    repeat[order] = later
    del order, later
    if keep_seen:
        seen = both[~repeat]
    return repeat[len(both) - len(digests):], seen


def _wanted(src: DataSource, num_available: int) -> int:
    """Rows to take: `count`, or `weight` x available rounded half up, or every row once."""
    if src.count is not None:
        return src.count
    if src.weight is not None:
        return int(math.floor(src.weight * num_available + 0.5))
    return num_available


def _multiplicity(num_available: int, num_wanted: int, rng: np.random.Generator) -> np.ndarray:
    """How often each available row is taken: every row num_wanted // num_available times, and a sample
    without repeats for the rest."""
    if not num_available:
        return np.zeros(0, np.int64)
    reps, rest = divmod(num_wanted, num_available)
    mult = np.full(num_available, reps, np.int64)
    if rest:
        mult[rng.choice(num_available, size=rest, replace=False)] += 1
    return mult


def _held_out(selections: list[_Selection], *, fraction: float, seed: int) -> np.ndarray:
    """Row ids held out: a fixed random share of the mixture's distinct contents, every copy of a chosen
    content held out together, so no held-out row is also trained on (a weight-2 repeat, or an
    identical row under dedup: none)."""
    if not fraction:
        return np.empty(0, np.int64)
    keys = np.concatenate([s.keys for s in selections]) if selections else np.empty(0, np.uint64)
    distinct, group = np.unique(keys, return_inverse=True)
    num_held = max(1, round(fraction * len(distinct)))
    if num_held >= len(distinct):
        raise UserError(f"data.eval_fraction={fraction} holds out {num_held} of the mixture's {len(distinct)} "
                        "distinct rows, leaving none to train on; lower it or give data.eval_files")
    chosen = np.zeros(len(distinct), bool)
    chosen[np.random.default_rng(seed % 2**63).choice(len(distinct), size=num_held, replace=False)] = True
    return np.flatnonzero(chosen[group])


# -- the manifest --------------------------------------------------------------------------------------

def _entry(src: DataSource, scan: _Scan, *, fresh: np.ndarray, dup_exact: np.ndarray, dup_normalised: np.ndarray,
           num_available: int, num_taken: int, sha256: str) -> dict[str, Any]:
    where = {"path": src.path} if src.path is not None else {"hf": src.hf, "hf_config": src.hf_config,
                                                             "split": src.split}
    weight = src.weight if src.weight is not None else (None if src.count is not None else 1.0)
    return {"name": src.label, **where, "weight": weight, "count": src.count, "read": scan.read,
            "bad_rows_skipped": scan.bad.num, "bad_rows_first": [f"{f}:{n}: {why}" for f, n, why in scan.bad],
            "duplicates_exact": int(dup_exact.sum()), "duplicates_normalised": int(dup_normalised.sum()),
            "too_short": int((fresh & (scan.verdict == TOO_SHORT)).sum()),
            "too_long": int((fresh & (scan.verdict == TOO_LONG)).sum()),
            "available": num_available, "taken": num_taken, "sha256": sha256}


def _summary(e: dict[str, Any]) -> str:
    parts = [f"{e['read']:,} row{'s' * (e['read'] != 1)} read"]
    if e["bad_rows_skipped"]:
        parts.append(f"{e['bad_rows_skipped']:,} bad skipped")
    if dups := e["duplicates_exact"] + e["duplicates_normalised"]:
        parts.append(f"{dups:,} duplicate{'s' * (dups != 1)}" + (
            f" ({e['duplicates_normalised']:,} after normalising)" if e["duplicates_normalised"] else ""))
    if e["too_short"]:
        parts.append(f"{e['too_short']:,} too short")
    if e["too_long"]:
        parts.append(f"{e['too_long']:,} too long")
    return f"data: {e['name']}: {', '.join(parts)} -> {e['available']:,} available, {e['taken']:,} taken"


def manifest_lines(manifest: dict[str, Any]) -> list[str]:
    """The manifest as a short table for logs and the report: one line per source, then the totals."""
    head = ("source", "read", "bad", "dup", "norm", "short", "long", "available", "taken", "sha256")
    rows = [head] + [(e["name"], f"{e['read']:,}", f"{e['bad_rows_skipped']:,}", f"{e['duplicates_exact']:,}",
                      f"{e['duplicates_normalised']:,}", f"{e['too_short']:,}", f"{e['too_long']:,}",
                      f"{e['available']:,}", f"{e['taken']:,}", e["sha256"][:12]) for e in manifest["sources"]]
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    out = ["  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths))) for r in rows]
    f = manifest["filters"]
    out.append(f"{manifest['rows']:,} rows ({manifest['held_out']:,} held out), seed {manifest['seed']}, dedup "
               f"{manifest['dedup']}, min_chars {f['min_chars']}, max_chars {f['max_chars']}, on_bad_row "
               f"{manifest['on_bad_row']}, content sha256 {manifest['content_sha256'][:16]}")
    return out
