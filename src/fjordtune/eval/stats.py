"""Noise estimates for the base-vs-tuned report: pure functions of results dicts (no Ray, no lm-eval).

A results dict is what `fjordtune eval` writes to results.json. A task entry may carry `per_doc`:
`{"doc_id": [...], "acc": [0, 1, ...], "acc_norm": [...]}`, one value per scored document, sorted by
doc_id. With it, standard errors use the documents the prompts and models share (paired); without
it (older results.json), they fall back to lm-eval's unpaired `<metric>_stderr`. docs/evaluation.md
("Report and noise") explains every formula.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

NOISE_SES = 2.0
"""A change is called larger than its noise when |change| > NOISE_SES standard errors."""

_VARIANT = re.compile(r"^(?P<base>.+)_(?P<lang>nob|nno)_p(?P<k>\d+)$")


@dataclass(frozen=True, kw_only=True)
class Estimate:
    """A score or a change with its standard error (None when it cannot be estimated, e.g. n < 2)."""

    value: float
    se: float | None
    paired: bool = False
    """True when `se` comes from per-document vectors, False when from lm-eval's stderr or p and n."""

    @property
    def num_ses(self) -> float | None:
        """|value| in standard errors (inf for a nonzero value with zero SE)."""
        if self.se is None:
            return None
        if self.se == 0:
            return 0.0 if self.value == 0 else math.inf
        return abs(self.value) / self.se

    @property
    def beyond_noise(self) -> bool:
        """|value| > NOISE_SES x SE. Never true without an SE."""
        return self.se is not None and abs(self.value) > NOISE_SES * self.se


@dataclass(frozen=True, kw_only=True)
class ModelGroup:
    """One model's prompt variants of one (family, lang)."""

    metric: str
    best_prompt: str
    best: Estimate
    mean: Estimate
    n: int
    chance: float | None
    num_prompts: int


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """Base vs tuned on one (family, lang); fields are None where a side or a prompt is missing."""

    base: ModelGroup | None
    tuned: ModelGroup | None
    same_prompt: str | None = None
    """Base's best prompt, the one both models are compared on."""
    tuned_on_same_prompt: Estimate | None = None
    same_prompt_change: Estimate | None = None
    """Tuned minus base on `same_prompt`, with a paired SE when both have per_doc."""
    best_change: Estimate | None = None
    """Tuned best minus base best (each chosen on the test set), with the unpaired SE of the two."""


def metric_of(entry: dict[str, Any]) -> tuple[str, float] | None:
    """The headline metric of a task: acc_norm where the task defines it, else acc (as NorEval reports)."""
    for m in ("acc_norm", "acc"):
        if m in entry:
            return m, entry[m]
    return None


def split_name(name: str) -> tuple[str, str, str]:
    """`<family>_<lang>_p<k>` -> (family, lang, "p<k>"); any other task name -> (name, "-", "-")."""
    m = _VARIANT.match(name)
    return (m["base"], m["lang"], f"p{m['k']}") if m else (name, "-", "-")


def mean_se(values: Sequence[float]) -> float | None:
    """Standard error of a mean: sample std (n - 1) / sqrt(n), as lm-eval's `mean_stderr`. For 0/1 values
    this is sqrt(p (1 - p) / (n - 1))."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1) / n)


def proportion_se(p: float, n: int) -> float | None:
    """sqrt(p (1 - p) / (n - 1)): lm-eval's acc_stderr of a proportion p over n documents."""
    return math.sqrt(max(p * (1 - p), 0.0) / (n - 1)) if n >= 2 else None


def per_doc(entry: dict[str, Any], metric: str) -> tuple[list[Any], list[float]] | None:
    """(doc ids, values) of `metric` from the entry's per_doc, or None when absent or malformed."""
    pd = entry.get("per_doc")
    if not isinstance(pd, dict) or not isinstance(pd.get(metric), list) or not isinstance(pd.get("doc_id"), list):
        return None
    if len(pd[metric]) != len(pd["doc_id"]) or not pd["doc_id"]:
        return None
    return pd["doc_id"], [float(x) for x in pd[metric]]


def score(entry: dict[str, Any], metric: str) -> Estimate:
    """One prompt's score and its SE: from per_doc, else lm-eval's `<metric>_stderr`, else from p and n."""
    got = per_doc(entry, metric)
    if got is not None:
        return Estimate(value=entry[metric], se=mean_se(got[1]), paired=True)
    se = entry.get(f"{metric}_stderr")
    if not isinstance(se, (int, float)):
        se = proportion_se(entry[metric], int(entry.get("n", 0)))
    return Estimate(value=entry[metric], se=se)


def prompt_mean(entries: Sequence[dict[str, Any]], metric: str) -> Estimate:
    """Mean score over prompt variants. The prompts score the same documents, so their errors are
    correlated: with per_doc, the SE is that of each document's mean correctness over the prompts
    (std / sqrt(n)). Without it, the mean of the prompts' SEs: an upper bound (the SE of the mean when the
    prompts are perfectly correlated), where the independent formula would understate it."""
    value = sum(e[metric] for e in entries) / len(entries)
    vectors = [v for e in entries if (v := per_doc(e, metric)) is not None]
    if len(vectors) == len(entries) and all(ids == vectors[0][0] for ids, _ in vectors):
        per_doc_means = [sum(col) / len(col) for col in zip(*(values for _, values in vectors))]
        return Estimate(value=value, se=mean_se(per_doc_means), paired=True)
    ses = [se for e in entries if (se := score(e, metric).se) is not None]
    return Estimate(value=value, se=sum(ses) / len(ses) if len(ses) == len(entries) else None)


def paired_change(base: dict[str, Any], tuned: dict[str, Any], metric: str) -> Estimate:
    """Tuned minus base on one prompt. With per_doc on both over the same documents, the SE is that of the
    per-document differences (std / sqrt(n)); otherwise the unpaired sqrt(se_b^2 + se_t^2), larger whenever
    the two models tend to get the same documents right."""
    value = tuned[metric] - base[metric]
    b, t = per_doc(base, metric), per_doc(tuned, metric)
    if b is not None and t is not None and b[0] == t[0]:
        return Estimate(value=value, se=mean_se([y - x for x, y in zip(b[1], t[1])]), paired=True)
    return unpaired_change(score(base, metric), score(tuned, metric))


def unpaired_change(base: Estimate, tuned: Estimate) -> Estimate:
    """tuned - base with SE sqrt(se_b^2 + se_t^2), as if the two scores were independent."""
    se = None if base.se is None or tuned.se is None else math.hypot(base.se, tuned.se)
    return Estimate(value=tuned.value - base.value, se=se)


def group_prompts(results: dict[str, Any]) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
    """{(family, lang): {prompt: task entry}} for every task with a headline metric."""
    groups: dict[tuple[str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for name, entry in results["tasks"].items():
        if metric_of(entry):
            family, lang, prompt = split_name(name)
            groups[(family, lang)][prompt] = entry
    return dict(sorted(groups.items()))


def model_group(prompts: dict[str, dict[str, Any]]) -> ModelGroup:
    """Best prompt (its score and SE) and the mean over prompts (with the shared-documents SE)."""
    headline = {p: got for p, e in prompts.items() if (got := metric_of(e)) is not None}
    best_prompt = max(headline, key=lambda p: headline[p][1])
    best = prompts[best_prompt]
    metric = headline[best_prompt][0]
    same_metric = [prompts[p] for p, (m, _) in headline.items() if m == metric]
    return ModelGroup(
        metric=metric, best_prompt=best_prompt, best=score(best, metric), mean=prompt_mean(same_metric, metric),
        n=int(best.get("n", 0)), chance=best.get("chance"), num_prompts=len(prompts),
    )


def compare(base: dict[str, Any] | None, tuned: dict[str, Any] | None) -> dict[tuple[str, str], Comparison]:
    """Per (family, lang): each model's best and mean, tuned on base's best prompt, and the changes."""
    groups_b = group_prompts(base) if base else {}
    groups_t = group_prompts(tuned) if tuned else {}
    out = {}
    for key in sorted(set(groups_b) | set(groups_t)):
        pb, pt = groups_b.get(key), groups_t.get(key)
        b = model_group(pb) if pb else None
        t = model_group(pt) if pt else None
        if b is None or t is None:
            out[key] = Comparison(base=b, tuned=t)
            continue
        same = groups_t[key].get(b.best_prompt)
        on_same = change = None
        if same is not None and b.metric in same:
            on_same = score(same, b.metric)
            change = paired_change(groups_b[key][b.best_prompt], same, b.metric)
        out[key] = Comparison(
            base=b, tuned=t, same_prompt=b.best_prompt, tuned_on_same_prompt=on_same, same_prompt_change=change,
            best_change=unpaired_change(b.best, t.best) if b.metric == t.metric else None,
        )
    return out
