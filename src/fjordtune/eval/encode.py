"""lm-eval's request tokenization, in batches, where the scoring runs: the Ray-free eval core.

lm-eval's `TemplateLM.loglikelihood` turns each (context, continuation) text pair into token ids with two
tokenizer calls (`_encode_pair`: the whole text and the context, the continuation being the difference).
`PairEncoder.encode_pairs` gives the same ids for a list of pairs in a few batched calls. The scoring
actors run it on their own units, so the driver never tokenizes: at the story's 16-shot prompts a full
NorEval run is ~1 G characters to encode, which one driver process would take minutes of CPU for while
every replica waits.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

PROBE = 64
"""Strings of the first batch of each kind on which the fast path is checked against the tokenizer's call."""


class PairEncoder:
    """Token ids of lm-eval requests, as `TemplateLM.loglikelihood` (causal models) makes them with
    `tok_encode` the way lm-eval's `hf` backend defines it: the tokenizer's own special-token default,
    except that a string already starting with the BOS text gets no second BOS.

    A fast tokenizer's Rust backend is called directly (`encode_batch(...)[i].ids`), checked once per kind
    of call against the tokenizer's own call on the first strings; any difference, or a slow tokenizer, and
    the tokenizer's own call is used."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._fast_ok: dict[bool | None, bool] = {}

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context stands for (lm-eval's `prefix_token_id` of `hf`: BOS, else EOS)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def encode(self, strings: Sequence[str], add_special_tokens: bool | None = None) -> list[list[int]]:
        """`[tok_encode(s, add_special_tokens) for s in strings]`, batched."""
        bos = self.tokenizer.bos_token
        out: list[list[int] | None] = [None] * len(strings)
        groups: dict[bool | None, list[int]] = {}
        for i, s in enumerate(strings):
            effective = False if add_special_tokens is None and bos and s.startswith(bos) else add_special_tokens
            groups.setdefault(effective, []).append(i)
        for effective, members in groups.items():
            part = [strings[i] for i in members]
            for i, ids in zip(members, self._encode_batch(part, effective), strict=True):
                out[i] = ids
        return out  # type: ignore[return-value]

    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """(context ids, continuation ids) of each (context, continuation) text pair, as lm-eval 0.4's
        `TemplateLM.loglikelihood` makes them for a causal model: trailing spaces of the context move to
        the continuation, the continuation's ids are the whole text's after the context's; an empty
        context stands for the prefix token (or the continuation's first token, when that is it)."""
        wholes: list[str] = []
        contexts: dict[str, int] = {}
        plan: list[tuple[int, int] | None] = []  # (index of the whole text, index of the context); None: empty
        empty: list[str] = []
        for context, continuation in pairs:
            if context == "":
                plan.append(None)
                empty.append(continuation)
                continue
            spaces = len(context) - len(context.rstrip())
            if spaces:
                continuation, context = context[-spaces:] + continuation, context[:-spaces]
            plan.append((len(wholes), contexts.setdefault(context, len(contexts))))
            wholes.append(context + continuation)
        whole_ids = self.encode(wholes)
        context_ids = self.encode(list(contexts))
        empty_ids = iter(self.encode(empty, add_special_tokens=False))
        out = []
        for step in plan:
            if step is None:
                cont = next(empty_ids)
                prefix = self.prefix_token_id
                out.append(([prefix], cont) if not cont or prefix != cont[0] else (cont[:1], cont[1:]))
                continue
            whole, ctx = whole_ids[step[0]], context_ids[step[1]]
            out.append((list(ctx), whole[len(ctx):]))
        return out

    def _encode_batch(self, strings: list[str], add_special: bool | None) -> list[list[int]]:
        if not strings:
            return []
        if self._fast_ok.get(add_special) is None:
            self._fast_ok[add_special] = self._fast_agrees(strings[:PROBE], add_special)
        if self._fast_ok[add_special]:
            return self._fast(strings, add_special)
        return self._slow(strings, add_special)

    def _slow(self, strings: list[str], add_special: bool | None) -> list[list[int]]:
        kw = {} if add_special is None else {"add_special_tokens": add_special}
        return [list(ids) for ids in self.tokenizer(strings, **kw)["input_ids"]]

    def _fast(self, strings: list[str], add_special: bool | None) -> list[list[int]]:
        special = True if add_special is None else bool(add_special)
        return [e.ids for e in self.tokenizer.backend_tokenizer.encode_batch(strings, add_special_tokens=special)]

    def _fast_agrees(self, probe: list[str], add_special: bool | None) -> bool:
        if not getattr(self.tokenizer, "is_fast", False) or getattr(self.tokenizer, "backend_tokenizer", None) is None:
            return False
        try:
            same = self._fast(probe, add_special) == self._slow(probe, add_special)
        except Exception:  # noqa: BLE001 - any trouble in the shortcut: the tokenizer's own call
            same = False
        if not same:
            log.info("the tokenizer's fast path differs from its own call; encoding through the call")
        return same


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides a tokenizer's ids: its class, its special tokens, and its full definition
    (the fast backend's JSON; else its vocabulary). Units are keyed by request text, so the results of one
    tokenizer are never taken for another's."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(repr(sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())).encode())
    h.update(repr((tokenizer.bos_token_id, tokenizer.eos_token_id)).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()[:20]
