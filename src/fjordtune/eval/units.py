"""Work units of an evaluation and their results in storage: what makes a run resumable and the base
model's scores reusable.

lm-eval hands the scorer a list of (context, continuation) text requests. `plan_units` cuts it into units
of at most `batch_size` requests, keeping the requests that share a context (a question's choices)
together so that the scorer forwards the context once. The actor that scores a unit also tokenizes it
(`eval/encode.py`): the driver only groups text. A unit is named by a hash of its requests' text alone,
so its result is valid wherever the same requests meet the same model and tokenizer:

    <storage.uri>/eval-cache/<model key>/model.json          what the key stands for (model, adapter, tokenizer)
    <storage.uri>/eval-cache/<model key>/units/<unit>.json   {"logprob": [...], "greedy": [...], "tokens": [...]}

The model key hashes the model's and the adapter's identity (the commit id of a committed folder), the
tokenizer's definition, the dtype and the scorer version. The requests already encode tasks, prompts,
few-shot examples and chat template, so a re-run, a restarted actor, or `fjordtune run` evaluating the
same base model again finds the finished units and scores only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fjordtune.errors import FjordtuneError

log = logging.getLogger(__name__)

SCORER_VERSION = 3
"""Bumped whenever scores of the same requests could change (scoring semantics, merging) or units change
meaning (3: units of request text, tokenized on the actor)."""

CACHE_DIR = "eval-cache"

Request = tuple[str, str]
"""(context, continuation) text, as lm-eval's `Instance.args` of a log-likelihood request."""
TokenRequest = tuple[Sequence[int], Sequence[int]]


@dataclass(frozen=True)
class Unit:
    """Requests scored together: one Ray Data batch, one object in storage."""

    key: str
    indices: tuple[int, ...]
    """Positions of the unit's requests in lm-eval's request list."""
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]

    def payload(self) -> str:
        """The requests as sent to an actor: each distinct context once (a question's 4-5 choices share it,
        and with 16-shot prompts it is thousands of characters)."""
        index: dict[str, int] = {}
        owner = [index.setdefault(ctx, len(index)) for ctx in self.contexts]
        return json.dumps([list(index), owner, self.continuations], separators=(",", ":"), ensure_ascii=False)

    @staticmethod
    def requests_of(payload: str) -> list[Request]:
        contexts, owner, continuations = json.loads(payload)
        return [(contexts[i], cont) for i, cont in zip(owner, continuations, strict=True)]


def _unit_key(contexts: Sequence[str], continuations: Sequence[str]) -> str:
    """sha256 over one line per request, `json.dumps([ctx, cont], separators=(",", ":"))` (UTF-8, ASCII
    escapes); a context shared by several requests is serialized once (the same bytes)."""
    h = hashlib.sha256()
    text: dict[str, bytes] = {}  # context -> its JSON
    for ctx, cont in zip(contexts, continuations, strict=True):
        ctx_json = text.get(ctx)
        if ctx_json is None:
            ctx_json = text[ctx] = json.dumps(ctx).encode()
        h.update(b"[" + ctx_json + b"," + json.dumps(cont).encode() + b"]\n")
    return h.hexdigest()[:32]


_WORDS = re.compile(r"\w+|[^\w\s]")
"""Words and punctuation marks: what a length in tokens is guessed from before tokenizing."""


def plan_units(requests: Sequence[Request], batch_size: int) -> list[Unit]:
    """Cut text requests into units of at most `batch_size`, longest first, a context's requests together.

    Deterministic for a given request list: the same evaluation always gives the same unit keys.
    """
    groups: dict[str, list[int]] = {}
    for i, (ctx, _) in enumerate(requests):
        groups.setdefault(ctx, []).append(i)

    def length(group: tuple[str, list[int]]) -> tuple[int, int, int]:
        ctx, members = group
        return (-len(_WORDS.findall(ctx)), -max(len(_WORDS.findall(requests[i][1])) for i in members), members[0])

    # longest first: padding wastes less within a unit, and the slowest units start early. The length is
    # counted in words and punctuation (full size NorEval: 1.20 padded cells per token, 1.24 counted in
    # characters, 1.14 in tokens, which only the actors have)
    order = sorted(groups.items(), key=length)
    units: list[Unit] = []
    current: list[int] = []

    def close() -> None:
        if current:
            ctx = tuple(requests[i][0] for i in current)
            cont = tuple(requests[i][1] for i in current)
            units.append(Unit(_unit_key(ctx, cont), tuple(current), ctx, cont))
            current.clear()

    for _, members in order:
        if len(current) + len(members) > batch_size:
            close()
        for start in range(0, len(members), batch_size):  # a context with more choices than a batch
            chunk = members[start : start + batch_size]
            if len(current) + len(chunk) > batch_size:
                close()
            current.extend(chunk)
    close()
    return units


def token_counts(requests: Iterable[TokenRequest]) -> tuple[int, int]:
    """(tokens forwarded scoring every pair in full, tokens forwarded scoring each context once): what
    shared contexts save, counted from the requests alone."""
    full = shared = 0
    seen: set[tuple[int, ...]] = set()
    for ctx, cont in requests:
        full += len(ctx) + len(cont) - 1
        shared += len(cont) - 1
        key = tuple(ctx)
        if key not in seen:
            seen.add(key)
            shared += len(key)
    return full, shared


@dataclass(frozen=True)
class UnitResult:
    """What scoring a unit gives: (log-likelihood, is_greedy) per request, in the unit's order, and the
    tokens it costs (`token_counts`: forwarding every pair in full, forwarding each context once)."""

    results: list[tuple[float, bool]]
    tokens: tuple[int, int]


def source_identity(location: str, *, store: Any) -> dict[str, Any] | None:
    """What pins a model or adapter folder's content: the commit id of a committed s3:// folder, file
    sizes and modification times of a local one, the revision of a hub repository. None when nothing
    pins it (results are then not reused)."""
    if location.startswith("s3://"):
        return {"uri": location, "commit": store.commit_id(location)}
    path = Path(location).expanduser()
    if path.is_dir():
        files = sorted((p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                       for p in path.rglob("*") if p.is_file())
        return {"path": str(path.resolve()), "files": hashlib.sha256(json.dumps(files).encode()).hexdigest()[:32]}
    try:  # a hub id: its current revision, when the hub answers
        from huggingface_hub import HfApi

        sha = HfApi().model_info(location, timeout=10).sha
    except Exception as e:  # noqa: BLE001 (offline, gated, unknown: just do not reuse results)
        log.info("%s: no revision from the hub (%s): its eval results are not reused", location, type(e).__name__)
        return None
    return {"hub": location, "revision": sha} if sha else None


class ResultStore:
    """Unit results of one model (+ adapter) under `<storage.uri>/eval-cache/<model key>`."""

    def __init__(self, store: Any, root_uri: str, identity: dict[str, Any]) -> None:
        self.store = store
        self.identity = {**identity, "scorer_version": SCORER_VERSION}
        key = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:20]
        self.uri = f"{root_uri.rstrip('/')}/{CACHE_DIR}/{key}"

    @classmethod
    def for_model(cls, store: Any, root_uri: str, *, model_uri: str, adapter_uri: str | None,
                  dtype: str, tokenizer: str) -> ResultStore | None:
        """None when the model or the adapter is not pinned to a content version. `tokenizer`: its
        fingerprint (`eval.encode.tokenizer_fingerprint`), since units are keyed by request text."""
        model = source_identity(model_uri, store=store)
        adapter = source_identity(adapter_uri, store=store) if adapter_uri else {}
        if model is None or adapter is None:
            return None
        return cls(store, root_uri, {"model": model, "adapter": adapter or None, "dtype": dtype,
                                     "tokenizer": tokenizer})

    def settings(self) -> dict[str, Any]:
        """Plain settings to rebuild this store in a Ray actor: `ResultStore.from_settings(store, ...)`."""
        return {"uri": self.uri, "identity": self.identity}

    @classmethod
    def from_settings(cls, store: Any, settings: dict[str, Any]) -> ResultStore:
        self = cls.__new__(cls)
        self.store, self.uri, self.identity = store, settings["uri"], settings["identity"]
        return self

    def _unit_uri(self, key: str) -> str:
        return f"{self.uri}/units/{key}.json"

    def describe(self) -> None:
        """Write model.json (once): which model, adapter and scorer the key stands for."""
        if self.store.get_object(f"{self.uri}/model.json") is None:
            self.store.put_object(f"{self.uri}/model.json", json.dumps(self.identity, indent=2).encode())

    def finished(self) -> set[str]:
        """Keys of every unit with a stored result."""
        return {rel[len("units/"):-len(".json")] for rel in self.store.list_objects(self.uri)
                if rel.startswith("units/") and rel.endswith(".json")}

    def read(self, key: str) -> UnitResult | None:
        """A unit's stored results; None when there are none, or when storage cannot be read (the unit
        is then scored: a storage outage costs work, never the eval)."""
        try:
            data = self.store.get_object(self._unit_uri(key))
        except FjordtuneError as e:
            log.warning("stored results of unit %s unreadable (%s); scoring it", key, str(e).splitlines()[0])
            return None
        if data is None:
            return None
        try:
            got = json.loads(data)
            results = [(float(lp), bool(g)) for lp, g in zip(got["logprob"], got["greedy"], strict=True)]
            full, shared = got["tokens"]
            return UnitResult(results, (int(full), int(shared)))
        except (ValueError, KeyError, TypeError):
            log.warning("%s: unreadable unit result; scoring it again", self._unit_uri(key))
            return None

    def read_many(self, keys: Iterable[str], *, threads: int = 16) -> dict[str, UnitResult]:
        keys = list(keys)
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(keys)))) as pool:
            got = list(pool.map(self.read, keys))
        return {k: r for k, r in zip(keys, got, strict=True) if r is not None}

    def write(self, key: str, got: UnitResult) -> bool:
        """Store a unit's results; a failed write is logged and skipped (scores are not lost: they still go
        back to the driver; only a later resume would score the unit again)."""
        body = {"logprob": [r[0] for r in got.results], "greedy": [r[1] for r in got.results],
                "tokens": list(got.tokens), "pid": os.getpid()}
        try:
            self.store.put_object(self._unit_uri(key), json.dumps(body, separators=(",", ":")).encode())
        except FjordtuneError as e:
            log.warning("eval results of unit %s not stored (%s); the run goes on", key, str(e).splitlines()[0])
            return False
        return True
