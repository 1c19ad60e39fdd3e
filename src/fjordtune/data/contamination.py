"""Are NorEval test items in the training data? Every training row against every NorEval item and field.

A training row is a chat row `{"messages": [{"role", "content"}, ...]}`; its text is all message contents
joined with newlines. Both sides are compared after `normalise` (NFKC, casefold, punctuation and symbols
to spaces), as word sequences, so that a copy with other case, spacing or punctuation is still a copy and a
match never starts or ends inside a word. Three rules, one record (`Hit`) per (eval item, field) per row:

- substring: the whole eval text occurs in the row (`kind="substring"`);
- n-gram: a word n-gram (`ngram`, 13) of the eval text occurs in the row (`kind="ngram"`); an eval text of
  `min_words`..`ngram`-1 words can only match whole;
- question+choices: a question shorter than `min_words` words is found together with every one of its
  choices, in any order, near it (`COMBINED_SLACK`): a short quiz question with its options reshuffled.

A field shorter than `min_words` words (a one-word choice such as "Glomma") never matches on its own: it
would flag every row that uses the word.

Speed: the index maps every `min(min_words, ngram)`-word prefix of every window that can match to the
windows it starts, so a row costs one dict lookup per word position plus an exact comparison for the few
candidates (docs/contamination.md, docs/benchmarks.md).
"""

from __future__ import annotations

import json
import logging
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

from fjordtune.errors import UserError
from fjordtune.eval.noreval import FAMILIES, LANGUAGES

log = logging.getLogger(__name__)

NOREVAL_SPLITS: tuple[tuple[str, str, str], ...] = tuple(
    (family.dataset_id, config, split)
    for family in FAMILIES.values()
    for config in LANGUAGES.values()
    for split in family.splits
)
"""(hf dataset id, config, split) of every split a NorEval task reads: scored splits and few-shot splits
alike (a few-shot example in the training data is as much a leak as a scored one)."""

SPAN_CHARS = 200
"""A hit's `span` is cut to this many characters."""

PROGRESS_EVERY = 10_000
"""`check_rows` calls its `progress` callback after every this many rows (and once at the end)."""

COMBINED_FIELD = "question+choices"
COMBINED_SLACK = 20
"""question+choices: every choice must be found within `2 x (words of the question and all its choices) +
COMBINED_SLACK` words before or after the question. Options listed with their question, in any order, with
labels and a line of instructions, are well inside; a short question answered by an essay that happens to
name every option somewhere (a question about a lake, an answer about lakes) is not a copied item. With
the whole row as the reach, such answers were 23 of 1,336,500 clean rows, with this reach 2
(docs/contamination.md)."""
_CHOICE_FIELDS = ("choices[", "answers[")  # the options a short question is matched with


# ------------------------------------------------------------------ normalisation


class _PunctToSpace(dict[int, str]):
    """A `str.translate` table that maps every Unicode P* and S* character to a space and leaves the
    rest as it is; filled on first sight of each code point, so no start-up scan of all of Unicode."""

    def __missing__(self, cp: int) -> str:
        ch = chr(cp)
        out = " " if unicodedata.category(ch)[0] in "PS" else ch
        self[cp] = out
        return out


_PUNCT = _PunctToSpace()
_ASCII_PUNCT = bytes(32 if c < 128 and unicodedata.category(chr(c))[0] in "PS" else c for c in range(256))


def normalise(text: str) -> str:
    """NFKC, casefold, Unicode punctuation and symbols (categories P*, S*) to spaces, whitespace collapsed
    to single spaces, stripped. "Hvem  skrev «Et dukkehjem»?" -> "hvem skrev et dukkehjem".

    NFKC runs again after casefolding, which can leave a few characters decomposed (Python's own recipe
    for caseless matching). Speed (this is a third of the cost of a check): ASCII punctuation goes in one
    `bytes.translate` of the UTF-8 text; only words still not alphanumeric after it (a «, a dash, an
    emoji) go through the per-character Unicode table, so a typical Norwegian row, full of æøå and free
    of exotic punctuation, never does. Same result as translating every character (tested)."""
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    words = text.encode("utf-8", "surrogatepass").translate(_ASCII_PUNCT).decode("utf-8", "surrogatepass").split()
    if not all(map(str.isalnum, words)):
        words = " ".join([w if w.isalnum() else w.translate(_PUNCT) for w in words]).split()
    return " ".join(words)


# ------------------------------------------------------------------ eval texts


@dataclass(frozen=True)
class EvalText:
    """One text field of one eval item."""

    dataset: str
    """Hugging Face dataset id, e.g. `ltg/nrk_quiz_qa`."""
    config: str
    """`nb` or `nn`."""
    split: str
    id: str
    """The row's `id` as a string; its 0-based row index in the split when it has none."""
    field: str
    """`question` (also NorOpenBookQA's `question_stem`), `choices[i]`, `fact`, `answers[i]` (NorTruthfulQA's
    `mc1_targets.choices`), `answers_mc2[i]` (a `mc2_targets` choice not among the mc1 ones); hits add
    `question+choices`."""
    text: str


def item_texts(dataset: str, config: str, split: str, index: int, row: dict[str, Any]) -> Iterator[EvalText]:
    """The text fields of one NorEval row (empty ones left out)."""
    rid = row.get("id")
    item_id = str(index) if rid is None or rid == "" else str(rid)

    def text(field: str, value: Any) -> Iterator[EvalText]:
        if isinstance(value, str) and value.strip():
            yield EvalText(dataset, config, split, item_id, field, value)

    question = row.get("question") or row.get("question_stem")
    yield from text("question", question)
    choices = row.get("choices")
    if isinstance(choices, dict):
        for i, choice in enumerate(choices.get("text") or ()):
            yield from text(f"choices[{i}]", choice)
    yield from text("fact", row.get("fact"))
    mc1 = (row.get("mc1_targets") or {}).get("choices") or ()
    for i, answer in enumerate(mc1):
        yield from text(f"answers[{i}]", answer)
    for i, answer in enumerate((row.get("mc2_targets") or {}).get("choices") or ()):
        if answer not in mc1:
            yield from text(f"answers_mc2[{i}]", answer)


def eval_texts_from_dir(data_dir: str | Path) -> Iterator[EvalText]:
    """Every text field of every NorEval split file under `data_dir` (the layout `eval.data_dir` reads:
    `<data_dir>/<hf_dataset_id>/<config>/<split>.jsonl`). Missing files are skipped: nothing at all comes
    out of a folder without NorEval files, and the caller decides whether that is an error."""
    for dataset, config, split in NOREVAL_SPLITS:
        path = Path(data_dir) / dataset / config / f"{split}.jsonl"
        if not path.is_file():
            continue
        index = 0
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{lineno}: a NorEval row must be a JSON object")
                yield from item_texts(dataset, config, split, index, row)
                index += 1


def eval_texts_from_hub() -> Iterator[EvalText]:
    """`eval_texts_from_dir`, read through `datasets.load_dataset(dataset_id, config, split=...)`.

    Any failure to load a split (no network, `HF_HUB_OFFLINE=1` without a cached copy, a gated dataset
    without a token) is a `UserError` of one line that names the split and the way out: datasets and
    huggingface_hub raise a dozen exception types for these, and none of them is a fjordtune bug."""
    try:
        import datasets
    except ImportError:
        raise UserError("reading NorEval from the Hugging Face hub needs the `datasets` package; "
                        "or give eval.data_dir") from None
    for dataset, config, split in NOREVAL_SPLITS:
        try:
            rows = datasets.load_dataset(dataset, config, split=split)
        except Exception as e:  # noqa: BLE001 - see the docstring
            why = (str(e).strip().splitlines() or [""])[0][:160]
            raise UserError(
                f"cannot load NorEval {dataset} ({config}, {split}) from the Hugging Face hub "
                f"({type(e).__name__}: {why}); give eval.data_dir with the files in the layout "
                "<data_dir>/<hf_dataset_id>/<config>/<split>.jsonl") from None
        for index, row in enumerate(rows):
            yield from item_texts(dataset, config, split, index, dict(row))


# ------------------------------------------------------------------ the index


@dataclass(frozen=True)
class Hit:
    """One eval item's field found in one training row."""

    train_file: str
    train_line: int
    eval_dataset: str
    eval_config: str
    eval_split: str
    eval_id: str
    field: str
    kind: str
    """`substring` (the whole eval text, or a short question and all its choices) or `ngram`."""
    span: str
    """What matched, normalised, cut to `SPAN_CHARS`: the eval text, the longest run of row words shared
    around the n-gram, or "question / choice / choice ..." for `question+choices`."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _grams(ids: tuple[int, ...], k: int) -> Iterator[tuple[int, ...]]:
    """Every k-word window of `ids`, in order (tuples built in C by zip, not by slicing in a loop)."""
    return zip(*[ids[j:] for j in range(k)])


@dataclass(frozen=True)
class _Combined:
    """A short question's item and its choices, each padded with spaces for a whole-word `in` test."""

    item: int
    question: str
    choices: tuple[str, ...]
    reach: int
    """How many words before or after the question the choices may be (`COMBINED_SLACK`)."""


class EvalIndex:
    """Every NorEval text, indexed for `check`. Build once (0.3 s for the full-size NorEval), then check
    any number of rows."""

    def __init__(self, texts: Iterable[EvalText], *, ngram: int = 13, min_words: int = 8) -> None:
        if ngram < 1 or min_words < 1:
            raise UserError(f"contamination check: ngram ({ngram}) and min_words ({min_words}) must be at least 1")
        self.ngram, self.min_words = ngram, min_words
        self._key_len = min(ngram, min_words)
        self._vocab: dict[str, int] = {}  # word -> id >= 1; a word no eval text has is 0 and matches nothing
        self._items: list[tuple[str, str, str, str]] = []  # (dataset, config, split, id)
        self._texts: list[tuple[int, ...]] = []  # distinct normalised texts (as word ids)
        self._norm: list[str] = []
        self._owners: list[list[tuple[int, str]]] = []  # per text: (item, field) it is
        # key (the first key_len words of a window) -> [(text, offset, window length)]
        self._windows: dict[tuple[int, ...], list[tuple[int, int, int]]] = {}
        # short questions: word ids -> items with their choices; (first two words) -> question lengths
        self._short: dict[tuple[int, ...], list[_Combined]] = {}
        self._short_prefix: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._short_one: set[tuple[int, ...]] = set()  # one-word short questions
        self._build(texts)

    @property
    def num_items(self) -> int:
        """Distinct (dataset, config, split, id)."""
        return len(self._items)

    @property
    def num_texts(self) -> int:
        """Distinct normalised texts indexed (a fact shared by forty items counts once)."""
        return len(self._texts)

    def _ids(self, words: list[str]) -> tuple[int, ...]:
        vocab = self._vocab
        return tuple(vocab.setdefault(w, len(vocab) + 1) for w in words)

    def _build(self, texts: Iterable[EvalText]) -> None:
        item_of: dict[tuple[str, str, str, str], int] = {}
        text_of: dict[str, int] = {}
        questions: dict[int, str] = {}  # item -> normalised question
        choices: dict[int, list[str]] = {}  # item -> normalised choices/answers
        num_repeated = 0
        for t in texts:
            key = (t.dataset, t.config, t.split, t.id)
            item = item_of.setdefault(key, len(item_of))
            if item == len(self._items):
                self._items.append(key)
            norm = normalise(t.text)
            if not norm:
                continue
            if t.field == "question":
                if item in questions:
                    num_repeated += 1
                questions[item] = norm
            elif t.field.startswith(_CHOICE_FIELDS):
                choices.setdefault(item, []).append(norm)
            words = norm.split(" ")
            if len(words) < self.min_words:
                continue  # never matched on its own
            idx = text_of.get(norm)
            if idx is None:
                idx = text_of[norm] = len(self._texts)
                self._add_text(norm, self._ids(words))
            self._owners[idx].append((item, t.field))
        if num_repeated:  # every field still matches; only question+choices mixes the rows up
            log.warning("contamination check: %d NorEval rows repeat the id of another row of their split; their "
                        "question+choices match takes the last question with the choices of all of them",
                        num_repeated)
        self._add_combined(questions, choices)

    def _add_text(self, norm: str, ids: tuple[int, ...]) -> None:
        idx = len(self._texts)
        self._texts.append(ids)
        self._norm.append(norm)
        self._owners.append([])
        n, k = self.ngram, self._key_len
        if len(ids) >= n:
            for off in range(len(ids) - n + 1):
                self._windows.setdefault(ids[off:off + k], []).append((idx, off, n))
        else:  # min_words..n-1 words: matched whole
            self._windows.setdefault(ids[:k], []).append((idx, 0, len(ids)))

    def _add_combined(self, questions: dict[int, str], choices: dict[int, list[str]]) -> None:
        """Index the items whose question is shorter than min_words but which, with all their choices,
        reach min_words words."""
        prefix_lengths: dict[tuple[int, ...], set[int]] = {}
        for item, question in questions.items():
            q_words = question.split(" ")
            opts = choices.get(item, [])
            if not opts or len(q_words) >= self.min_words:
                continue
            total = len(q_words) + sum(len(c.split(" ")) for c in opts)
            if total < self.min_words:
                continue
            ids = self._ids(q_words)
            combined = _Combined(item, question, tuple(f" {c} " for c in opts), 2 * total + COMBINED_SLACK)
            self._short.setdefault(ids, []).append(combined)
            if len(ids) == 1:
                self._short_one.add(ids)
            else:
                prefix_lengths.setdefault(ids[:2], set()).add(len(ids))
        self._short_prefix = {k: tuple(sorted(v)) for k, v in prefix_lengths.items()}

    def check(self, train_file: str, train_line: int, texts: Sequence[str]) -> list[Hit]:
        """Hits of one training row (`texts`: its message contents), one per (eval item, field), ordered
        by item (in the order the index read them) and field."""
        norm = normalise("\n".join(t if isinstance(t, str) else _content_text(t) for t in texts))
        if not norm or not self._items:
            return []
        words = norm.split(" ")
        row = tuple(map(self._vocab.get, words, repeat(0)))
        padded = f" {norm} "
        found: dict[int, tuple[str, str]] = {}  # text -> (kind, span)
        windows, texts_ids = self._windows, self._texts
        get = windows.get
        for pos, entries in [(i, e) for i, key in enumerate(_grams(row, self._key_len)) if (e := get(key))]:
            for text, off, length in entries:
                best = found.get(text)
                if best is not None and best[0] == "substring":
                    continue
                ids = texts_ids[text]
                if row[pos:pos + length] != ids[off:off + length]:
                    continue  # the key is only the first words of the window
                # the whole text is looked for once per row, at its first window found
                if best is None and (length == len(ids) or f" {self._norm[text]} " in padded):
                    found[text] = ("substring", self._norm[text])
                    continue
                span = _extend(row, words, pos, ids, off, length)
                if best is None or len(span) > len(best[1]):
                    found[text] = ("ngram", span)
        hits = [(item, field, kind, span) for text, (kind, span) in found.items()
                for item, field in self._owners[text]]
        hits += [(c.item, COMBINED_FIELD, "substring", " / ".join([c.question, *(s.strip() for s in c.choices)]))
                 for c in self._combined_hits(row, words)]
        hits.sort(key=lambda h: (h[0], h[1]))
        return [Hit(train_file, train_line, *self._items[item], field, kind, span[:SPAN_CHARS])
                for item, field, kind, span in hits]

    def _combined_hits(self, row: tuple[int, ...], words: list[str]) -> list[_Combined]:
        """Items whose short question is in the row with every one of its choices near it."""
        if not self._short:
            return []
        found: list[tuple[int, tuple[int, ...]]] = []  # (position, question) of each short question
        get = self._short_prefix.get
        for pos, lengths in [(i, ls) for i, key in enumerate(_grams(row, 2)) if (ls := get(key))]:
            found += [(pos, q) for n in lengths if (q := row[pos:pos + n]) in self._short]
        if self._short_one:
            found += [(pos, q) for pos, q in enumerate(_grams(row, 1)) if q in self._short_one]
        hits: dict[int, _Combined] = {}
        for pos, q in found:
            for c in self._short[q]:
                if c.item not in hits:
                    near = f" {' '.join(words[max(0, pos - c.reach):pos + len(q) + c.reach])} "
                    if all(s in near for s in c.choices):
                        hits[c.item] = c
        return list(hits.values())


def _extend(row: tuple[int, ...], words: list[str], pos: int, ids: tuple[int, ...], off: int, length: int) -> str:
    """The row words of the longest run shared with the eval text around a matched window."""
    start, t_start = pos, off
    while start > 0 and t_start > 0 and row[start - 1] == ids[t_start - 1]:
        start, t_start = start - 1, t_start - 1
    end, t_end = pos + length, off + length
    while end < len(row) and t_end < len(ids) and row[end] == ids[t_end]:
        end, t_end = end + 1, t_end + 1
    return " ".join(words[start:end])


def _content_text(content: Any) -> str:
    """A message content that is not a string: a list of parts ({"type": "text", "text": ...}) or nothing."""
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "" if content is None else str(content)


# ------------------------------------------------------------------ checking rows


@dataclass
class CheckResult:
    hits: list[Hit]
    train_rows: int
    eval_items: int
    seconds: float
    """Wall time of the check (reading the rows from the iterator included)."""

    def to_json(self) -> dict[str, Any]:
        return {"hits": [h.to_dict() for h in self.hits], "train_rows": self.train_rows,
                "eval_items": self.eval_items, "seconds": self.seconds}

    @property
    def contaminated_rows(self) -> set[tuple[str, int]]:
        """(train_file, train_line) of every row with at least one hit."""
        return {(h.train_file, h.train_line) for h in self.hits}


def row_texts(row: Any, *, where: str = "row") -> list[str]:
    """The message contents of a chat row; `UserError` (naming `where`, e.g. "train.jsonl:12") if the row
    has no list of messages."""
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list):
        raise UserError(f"{where}: not a chat row: expected {{\"messages\": [{{\"role\", \"content\"}}, ...]}}")
    return [_content_text(m.get("content")) if isinstance(m, dict) else "" for m in messages]


def check_rows(rows: Iterable[tuple[str, int, dict[str, Any]]], index: EvalIndex, *,
               progress: Callable[[int], None] | None = None) -> CheckResult:
    """Check (train_file, train_line, row) triples as they come: only the hits are kept, never the rows."""
    t0 = time.perf_counter()
    hits: list[Hit] = []
    num_rows = 0
    for train_file, train_line, row in rows:
        hits.extend(index.check(train_file, train_line, row_texts(row, where=f"{train_file}:{train_line}")))
        num_rows += 1
        if progress is not None and num_rows % PROGRESS_EVERY == 0:
            progress(num_rows)
    if progress is not None and num_rows % PROGRESS_EVERY:
        progress(num_rows)
    return CheckResult(hits, num_rows, index.num_items, time.perf_counter() - t0)


_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


def _clean_name(train_file: str, taken: set[str], ordinal: int) -> str:
    """The basename of a training file (local path or URI) with a .jsonl extension, prefixed with the
    file's ordinal if another file already took that name."""
    name = train_file.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1] or "train"
    for suffix in _COMPRESSED:
        name = name.removesuffix(suffix)
    if not name.endswith(".jsonl"):
        name = (name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name) + ".jsonl"
    candidate, bump = name, ordinal
    while candidate in taken:
        candidate, bump = f"{bump}-{name}", bump + 1
    taken.add(candidate)
    return candidate


def write_removed(rows: Iterable[tuple[str, int, dict[str, Any]]], result: CheckResult,
                  out_dir: str | Path) -> dict[str, Path]:
    """Write each training file without its contaminated rows (`out_dir/<basename>.jsonl`) and every
    removed row with its hits (`out_dir/removed.jsonl`); `rows` is a second pass over what was checked.

    Returns {train_file: cleaned path, "removed": removed.jsonl}. Two training files with the same
    basename are told apart by a prefix (`1-train.jsonl`). One file is open at a time (reopened for
    appending when rows of files interleave), so any number of training files works."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hits_of: dict[tuple[str, int], list[Hit]] = {}
    for h in result.hits:
        hits_of.setdefault((h.train_file, h.train_line), []).append(h)
    removed_path = out / "removed.jsonl"
    taken = {removed_path.name}
    paths: dict[str, Path] = {}
    current: tuple[str, Any] | None = None
    with open(removed_path, "w", encoding="utf-8") as removed:
        try:
            for train_file, train_line, row in rows:
                hits = hits_of.get((train_file, train_line))
                if train_file not in paths:
                    paths[train_file] = out / _clean_name(train_file, taken, len(paths))
                    paths[train_file].write_text("", encoding="utf-8")  # a file with every row removed exists too
                if hits:
                    removed.write(json.dumps({"train_file": train_file, "train_line": train_line, "row": row,
                                              "hits": [h.to_dict() for h in hits]}, ensure_ascii=False) + "\n")
                    continue
                if current is None or current[0] != train_file:
                    if current is not None:
                        current[1].close()
                    current = (train_file, open(paths[train_file], "a", encoding="utf-8"))  # noqa: SIM115
                current[1].write(json.dumps(row, ensure_ascii=False) + "\n")
        finally:
            if current is not None:
                current[1].close()
    return {**paths, "removed": removed_path}
