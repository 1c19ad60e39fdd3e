"""Training-data sources read as streams of chat rows that know where they came from.

A source is a JSON-lines file, a Parquet file (local or s3://) or a `datasets` dataset. Readers hold one
line, one Parquet batch or one dataset slice at a time, never a whole file: a mixture of millions of
rows is planned on the Ray driver (`fjordtune.data.mixture`) from these streams, and each Ray Data task
later reads back only its own chunk (`read_chunk`: one ranged read for JSON lines).

Every row carries its provenance (`SourceRow.file`, `.line`), so a bad row, a duplicate or a
contaminated row can be named by file and line.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fjordtune.config.schema import DataSource
from fjordtune.errors import UserError

if TYPE_CHECKING:
    from fjordtune.storage import Store

ROLES = ("system", "user", "assistant")
SHAPE = 'expected {"messages": [{"role", "content"}, ...]}'
STREAM_BLOCK = 8 << 20
"""Bytes per ranged GET when an s3:// JSON-lines file is streamed: a few requests per GiB, one block in memory."""
PARQUET_BATCH = 1024
_CANONICAL = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class SourceRow:
    """One valid chat row and where it came from."""

    file: str  # the path/URI as written in the job; for hf: "hf:<id>[/<config>]:<split>"
    line: int  # 1-based line (JSONL) or 1-based row number (Parquet, hf)
    row: dict[str, Any]  # the parsed row (all keys kept)
    offset: int = -1  # JSONL: byte offset of the line's start; -1 otherwise
    length: int = 0  # JSONL: byte length of the line incl. newline


class BadRowError(UserError):
    """A row that is not a chat row: "FILE:LINE: what is wrong"."""


# -- what a valid row is ---------------------------------------------------------------------------

def row_problem(row: Any) -> str | None:
    """Why `row` is not a chat row (one short phrase), or None when it is one."""
    msgs = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(msgs, list) or not msgs:
        return SHAPE
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"{SHAPE} (messages[{i}] is not a {{role, content}} object)"
        if m["role"] not in ROLES:
            return f"role {m['role']!r} is not system, user or assistant (messages[{i}])"
        if not isinstance(m["content"], str):
            return f"{SHAPE} (messages[{i}].content is {type(m['content']).__name__}, not a string)"
    if not any(m["role"] == "assistant" for m in msgs):
        return "no assistant turn, so nothing to learn from"
    return None


def parse_line(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(row, None) for a valid JSON-lines chat row, else (None, what is wrong)."""
    try:
        row = json.loads(raw.rstrip(b"\r\n"))  # without its newline, a cut-off line reads as unterminated
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg})"
    problem = row_problem(row)
    return (None, problem) if problem else (row, None)


# -- content digests: what makes two rows the same ---------------------------------------------------

def canonical_messages(messages: list[dict[str, Any]]) -> bytes:
    """The messages as canonical JSON (sorted keys, no spaces, null-valued keys left out), so a row reads
    the same from JSON lines, Parquet (which fills absent struct fields with null) and `datasets`."""
    if any(None in m.values() for m in messages):
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    return _CANONICAL.encode(messages).encode()


def exact_digest(messages: list[dict[str, Any]]) -> bytes:
    """128-bit digest of the messages exactly as written (blake2b: the manifest's sha256 over these digests
    is then as strong as it claims)."""
    return hashlib.blake2b(canonical_messages(messages), digest_size=16).digest()


class _Blanks(dict[int, int]):
    """A `str.translate` table built lazily: punctuation and symbols (Unicode P* and S*) become spaces,
    everything else stays. Only characters actually met are looked up, not all of Unicode."""

    def __missing__(self, code: int) -> int:
        self[code] = 32 if unicodedata.category(chr(code))[0] in "PS" else code
        return self[code]


_BLANKS = _Blanks()


def normalise(text: str) -> str:
    """NFKC, casefolded, punctuation and symbols as spaces, whitespace collapsed: "Hei, Verden!" and
    "hei verden" are the same text."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().translate(_BLANKS).split())


def normalised_digest(messages: list[dict[str, Any]]) -> bytes:
    """128-bit digest of the roles and normalised contents: rows differing only in case, punctuation,
    whitespace or Unicode form share it."""
    h = hashlib.blake2b(digest_size=16)
    for m in messages:
        h.update(f"{m['role']}\x00{normalise(m['content'])}\x01".encode())
    return h.digest()


# -- naming sources ---------------------------------------------------------------------------------

def source_file(src: DataSource) -> str:
    """What `SourceRow.file` says for rows of `src`."""
    if src.hf is not None:
        return f"hf:{src.hf}" + (f"/{src.hf_config}" if src.hf_config else "") + f":{src.split}"
    return str(src.path)


def source_kind(src: DataSource) -> str:
    """"hf", "parquet" or "jsonl" (any path not ending in .parquet)."""
    if src.hf is not None:
        return "hf"
    return "parquet" if str(src.path).lower().endswith(".parquet") else "jsonl"


# -- reading ------------------------------------------------------------------------------------------

def iter_source(src: DataSource, *, store: Store, key: str = "data", on_bad_row: str = "error",
                bad: list[Any] | None = None) -> Iterator[SourceRow]:
    """Every valid row of `src`, in file order, streamed.

    `key` is the job key the source came from, for the "no such file" message. A bad row raises
    `BadRowError` ("FILE:LINE: what is wrong"), or with `on_bad_row="skip"` is appended to `bad` as
    (file, line, reason) and left out. Blank JSON lines are not rows and are passed over silently.
    """
    if on_bad_row not in ("error", "skip"):
        raise UserError(f"data.on_bad_row: {on_bad_row!r}: expected error or skip")
    file = source_file(src)
    kind = source_kind(src)
    if kind == "jsonl":
        raws: Iterator[tuple[int, int, bytes]] = _jsonl_lines(str(src.path), store=store, key=key)
        for lineno, offset, raw in raws:
            if not raw.strip():
                continue
            row, problem = parse_line(raw)
            if row is None:
                _bad(file, lineno, str(problem), on_bad_row, bad)
                continue
            yield SourceRow(file, lineno, row, offset, len(raw))
        return
    rows = _parquet_rows(str(src.path), store=store, key=key) if kind == "parquet" else _hf_rows(src, key=key)
    for lineno, row in enumerate(rows, 1):
        problem = row_problem(row)
        if problem:
            _bad(file, lineno, problem, on_bad_row, bad)
            continue
        yield SourceRow(file, lineno, row)


def _bad(file: str, line: int, reason: str, on_bad_row: str, bad: list[Any] | None) -> None:
    if on_bad_row == "error":
        raise BadRowError(f"{file}:{line}: {reason}")
    if bad is not None:
        bad.append((file, line, reason))


def _jsonl_lines(path: str, *, store: Store, key: str) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, raw line incl. its newline) of a local or s3:// JSON-lines file."""
    if path.startswith("s3://"):
        yield from _s3_lines(path, store=store, key=key)
        return
    try:
        fh = open(path, "rb")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise UserError(f"{key}: {path}: no such file") from None
    with fh:
        offset = 0
        for lineno, raw in enumerate(fh, 1):
            yield lineno, offset, raw
            offset += len(raw)


def _s3_lines(uri: str, *, store: Store, key: str) -> Iterator[tuple[int, int, bytes]]:
    """Lines of an S3 object read as consecutive ranged GETs of `STREAM_BLOCK` bytes: one block in memory,
    and each block retried on its own (`Store.read_range`) instead of restarting the whole object."""
    start = lineno = 0
    carry = b""
    while True:
        try:
            block = store.read_range(uri, start + len(carry), start + len(carry) + STREAM_BLOCK)
        except UserError:
            if start == 0 and not carry:
                raise UserError(f"{key}: {uri}: no such object") from None
            raise
        data = carry + block
        end = data.rfind(b"\n") + 1 if len(block) == STREAM_BLOCK else len(data)
        pos = 0
        while pos < end:
            nl = data.find(b"\n", pos, end)
            stop = end if nl < 0 else nl + 1
            lineno += 1
            yield lineno, start + pos, data[pos:stop]
            pos = stop
        if len(block) < STREAM_BLOCK:
            return
        start += end
        carry = data[end:]


class _RangeFile(io.RawIOBase):
    """A read-only, seekable file over `Store.read_range`, so pyarrow reads an s3:// Parquet file's footer
    and column chunks with ranged GETs (and the store's retries) instead of downloading it."""

    def __init__(self, store: Store, uri: str, size: int) -> None:
        self.store, self.uri, self.size, self.pos = store, uri, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def readinto(self, buf: Any) -> int:
        data = self.store.read_range(self.uri, self.pos, min(self.pos + len(buf), self.size))
        buf[: len(data)] = data
        self.pos += len(data)
        return len(data)


def _parquet_file(path: str, *, store: Store, key: str) -> Any:
    import pyarrow.parquet as pq

    if path.startswith("s3://"):
        from botocore.exceptions import ClientError

        from fjordtune.storage.store import NOT_FOUND, Location

        loc = Location.parse(path)
        with store.errors(path):
            try:
                size = int(store.s3.head_object(Bucket=loc.bucket, Key=loc.key)["ContentLength"])
            except ClientError as e:
                if str(e.response.get("Error", {}).get("Code", "")) in NOT_FOUND:
                    raise UserError(f"{key}: {path}: no such object") from None
                raise
        return pq.ParquetFile(io.BufferedReader(_RangeFile(store, path, size), buffer_size=1 << 20))
    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise UserError(f"{key}: {path}: no such file") from None


def _parquet_rows(path: str, *, store: Store, key: str, row_groups: list[int] | None = None) -> Iterator[dict[str, Any]]:
    pf = _parquet_file(path, store=store, key=key)
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH, row_groups=row_groups):
        yield from batch.to_pylist()


@functools.lru_cache(maxsize=4)
def _load_hf(hf: str, config: str | None, split: str) -> Any:
    """The dataset, memory-mapped from the `datasets` cache: loaded once per process, since every chunk of
    the same source opens it again."""
    import datasets

    return datasets.load_dataset(hf, config, split=split)


def _hf_dataset(src: DataSource, *, key: str) -> Any:
    try:
        return _load_hf(str(src.hf), src.hf_config, src.split)
    except FileNotFoundError as e:  # also datasets' DatasetNotFoundError
        raise UserError(f"{key}: {src.hf}: no such dataset or folder ({' '.join(str(e).split())[:300]})") from None
    except ValueError as e:  # an unknown split or config
        raise UserError(f"{key}: {src.hf}: {' '.join(str(e).split())[:300]}") from None


def _hf_rows(src: DataSource, *, key: str, start: int = 0, stop: int | None = None) -> Iterator[dict[str, Any]]:
    ds = _hf_dataset(src, key=key)
    stop = len(ds) if stop is None else min(stop, len(ds))
    for a in range(start, stop, PARQUET_BATCH):
        batch = ds[a : min(a + PARQUET_BATCH, stop)]
        names = list(batch)
        for values in zip(*(batch[n] for n in names)):
            yield dict(zip(names, values))


# -- chunks: what one Ray Data task reads -----------------------------------------------------------------

def chunk_lines(chunk: dict[str, Any]) -> list[int]:
    """The line (or row) number of each row of a chunk, in order: `first_line` plus the running sum of
    `line_steps` (0 for a repeat of the line before, 1 for the next line)."""
    lines, line = [], chunk["first_line"]
    for step in chunk["line_steps"]:
        line += step
        lines.append(line)
    return lines


def read_chunk(chunk: dict[str, Any], *, store: Store) -> list[tuple[int, SourceRow]]:
    """The (row id, row) pairs of one chunk of a planned mixture (`Plan.chunks`), read with one ranged read
    for JSON lines (a local seek, or one S3 GET with a Range header) or one row range for Parquet and hf.
    Which rows are held out is `chunk["held"]` (row ids).

    The rows are checked against the digests taken when the mixture was planned: a file changed since
    then is an error, never silently different training data.
    """
    src = DataSource(**chunk["source"])
    file = source_file(src)
    lines = chunk_lines(chunk)
    first, start, end = chunk["first_line"], chunk["start"], chunk["end"]
    found: dict[int, SourceRow] = {}
    wanted = set(lines)
    if chunk["kind"] == "jsonl":
        data = store.read_range(str(src.path), start, end)
        pos, lineno = 0, first
        while pos < len(data):
            nl = data.find(b"\n", pos)
            stop = len(data) if nl < 0 else nl + 1
            row = parse_line(data[pos:stop])[0] if lineno in wanted else None
            if row is not None:
                found[lineno] = SourceRow(file, lineno, row, start + pos, stop - pos)
            pos, lineno = stop, lineno + 1
    else:
        if chunk["kind"] == "parquet":
            rows = _chunk_parquet_rows(str(src.path), start, end, store=store)
        else:
            rows = _hf_rows(src, key=file, start=start, stop=end)
        for lineno, row in enumerate(rows, start + 1):
            if lineno in wanted and row_problem(row) is None:
                found[lineno] = SourceRow(file, lineno, row)
    out, check = [], hashlib.blake2b(digest_size=8)
    for i, lineno in enumerate(lines):
        sr = found.get(lineno)
        if sr is None:
            raise UserError(_changed(chunk, file, f"line {lineno} is no longer a valid chat row"))
        check.update(exact_digest(sr.row["messages"])[:8])
        out.append((chunk["first_row"] + i, sr))
    if check.hexdigest() != chunk["check"]:
        raise UserError(_changed(chunk, file, "its content differs"))
    return out


def _changed(chunk: dict[str, Any], file: str, what: str) -> str:
    last = chunk["first_row"] + len(chunk["line_steps"]) - 1
    return (f"{file}: changed since the mixture was planned (rows {chunk['first_row']}-{last}: {what}); a "
            "training source must not change during a run: plan the mixture again")


def _chunk_parquet_rows(path: str, start: int, stop: int, *, store: Store) -> Iterator[dict[str, Any]]:
    """Rows [start, stop) of a Parquet file, reading only the row groups that hold them."""
    pf = _parquet_file(path, store=store, key=path)
    groups, first, row = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row + n > start and row < stop:
            groups.append(g)
            first = row if first is None else first
        row += n
    if not groups:
        return
    pos = int(first)  # type: ignore[arg-type]
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH, row_groups=groups):
        if pos + batch.num_rows > start:
            a, b = max(start - pos, 0), min(stop - pos, batch.num_rows)
            yield from batch.slice(a, b - a).to_pylist()
        pos += batch.num_rows
        if pos >= stop:
            return
