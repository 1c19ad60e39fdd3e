"""Base-vs-tuned report: a Markdown table per task and language (best prompt and mean over the prompt
variants, each with its standard error; tuned on base's best prompt and the change there with a paired
SE), a paragraph saying in words which changes are larger than their noise, and a PNG chart with SE bars
and chance marked. The statistics live in `fjordtune.eval.stats`; docs/evaluation.md explains them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fjordtune.eval.stats import (
    NOISE_SES,
    Comparison,
    Estimate,
    ModelGroup,
    compare,
    group_prompts,
    metric_of,
    model_group,
)

__all__ = ["aggregate", "markdown_table", "metric_of", "noise_words", "plot", "write_report"]

_FAMILY_LABELS = {
    "norcommonsenseqa": "NorCommonsenseQA",
    "noropenbookqa": "NorOpenBookQA",
    "nortruthfulqa_mc": "NorTruthfulQA (mc)",
    "nrk_quiz_qa": "NRK-Quiz-QA",
}
MARK = "*"
"""Appended to a same-prompt change larger than NOISE_SES standard errors."""


def aggregate(results: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """{(family, lang): {"best", "best_se", "best_prompt", "mean", "mean_se", "metric", "n", "chance",
    "num_prompts"}} over prompt variants (SEs None where they cannot be estimated)."""
    out = {}
    for key, prompts in group_prompts(results).items():
        g = model_group(prompts)
        out[key] = {"best": g.best.value, "best_se": g.best.se, "best_prompt": g.best_prompt, "mean": g.mean.value,
                    "mean_se": g.mean.se, "metric": g.metric, "n": g.n, "chance": g.chance,
                    "num_prompts": g.num_prompts}
    return out


def markdown_table(base: dict[str, Any] | None, tuned: dict[str, Any] | None) -> str:
    """One row per task and language, scores in points (x100) with +- one standard error."""
    rows = compare(base, tuned)
    lines = [
        "| task | lang | metric | base best ± SE (prompt) | base mean ± SE | tuned best ± SE (prompt) | tuned mean ± SE "
        "| tuned on base's best prompt | change (same prompt) ± SE | n | chance |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cols: dict[str, list[float]] = {c: [] for c in ("b_best", "b_mean", "t_best", "t_mean", "t_same", "change")}
    for key, c in rows.items():
        ref = c.tuned or c.base
        assert ref is not None  # compare() makes a row only for a key one of the models has
        lines.append(
            f"| {_FAMILY_LABELS.get(key[0], key[0])} | {key[1]} | {ref.metric} | "
            f"{_best_cell(c.base)} | {_est(c.base.mean if c.base else None)} | "
            f"{_best_cell(c.tuned)} | {_est(c.tuned.mean if c.tuned else None)} | "
            f"{_est(c.tuned_on_same_prompt)} | {_change_cell(c.same_prompt_change)} | {ref.n} | {_pct(ref.chance)} |"
        )
        for col, est in (("b_best", c.base and c.base.best), ("b_mean", c.base and c.base.mean),
                         ("t_best", c.tuned and c.tuned.best), ("t_mean", c.tuned and c.tuned.mean),
                         ("t_same", c.tuned_on_same_prompt), ("change", c.same_prompt_change)):
            if est:
                cols[col].append(est.value)
    avg = {col: (sum(v) / len(v) if v else None) for col, v in cols.items()}
    change = "-" if avg["change"] is None else f"{100 * avg['change']:+.1f}"
    lines.append(f"| **average** | | | {_pct(avg['b_best'])} | {_pct(avg['b_mean'])} | {_pct(avg['t_best'])} | "
                 f"{_pct(avg['t_mean'])} | {_pct(avg['t_same'])} | {change} | | |")
    return "\n".join(lines)


def noise_words(base: dict[str, Any] | None, tuned: dict[str, Any] | None) -> str:
    """A paragraph saying which same-prompt changes are larger than NOISE_SES standard errors and which are
    within the noise, and that best-of-prompts is chosen on the test set."""
    rows = compare(base, tuned)
    changes = {key: c for key, c in rows.items() if c.same_prompt_change is not None}
    lead = "**Beyond noise?**"
    caveat = ("Best-of-5 picks each model's prompt on the test set itself, so both best columns are biased "
              "upward and a best-vs-best difference can come from the choice alone; ")
    if not changes:
        return f"{lead} No task has both models on the same prompt: no change to judge. {caveat.rstrip('; ')}."
    beyond = [_named_change(k, c) for k, c in changes.items() if c.same_prompt_change.beyond_noise]
    no_se = [_label(k) for k, c in changes.items() if c.same_prompt_change.se is None]
    within = [_named_change(k, c) for k, c in changes.items()
              if c.same_prompt_change.se is not None and not c.same_prompt_change.beyond_noise]
    parts = [f"{lead} Tuned vs base on base's best prompt, larger than {NOISE_SES:g} SE: "
             f"{'; '.join(beyond) if beyond else 'none'}. Within noise: {'; '.join(within) if within else 'none'}."]
    if no_se:
        parts.append(f"No SE (fewer than 2 documents): {', '.join(no_se)}.")
    unpaired = [_label(k) for k, c in changes.items() if not c.same_prompt_change.paired]
    if unpaired:
        which = "all tasks" if len(unpaired) == len(changes) else ", ".join(unpaired)
        parts.append(f"Without per-document results on the same documents for both (e.g. an older results.json), "
                     f"unpaired SEs from lm-eval's stderr (usually larger than paired ones): {which}.")
    best_beyond = [f"{_label(k)} {100 * c.best_change.value:+.1f}" for k, c in rows.items()
                   if c.best_change is not None and c.best_change.beyond_noise]
    parts.append(caveat + (f"with the unpaired SE of the two chosen prompts (the choice not included), best-vs-best "
                           f"changes beyond {NOISE_SES:g} SE: {', '.join(best_beyond) if best_beyond else 'none'}."))
    return " ".join(parts)


def held_out_table(train: dict[str, Any] | None) -> str | None:
    """Base and tuned loss on the held-out rows (mean per assistant token; lower is better), or None when
    the run had no held-out data."""
    if not train or train.get("eval_loss") is None:
        return None
    base, tuned = train.get("base_eval_loss"), train["eval_loss"]
    change = f"{tuned - base:+.4f} ({(tuned - base) / base:+.1%})" if base else "-"
    return "\n".join([
        "| held-out loss | base | tuned | change |",
        "|---|---:|---:|---:|",
        f"| per assistant token | {'-' if base is None else f'{base:.4f}'} | {tuned:.4f} | {change} |",
    ])


def plot(base: dict[str, Any] | None, tuned: dict[str, Any] | None, path: str | Path) -> Path:
    """Grouped bars of best-of-prompts scores per task and language with +-1 SE error bars, chance marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg_b = aggregate(base) if base else {}
    agg_t = aggregate(tuned) if tuned else {}
    keys = sorted(set(agg_b) | set(agg_t))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(keys) + 2), 4.2), dpi=120)
    width = 0.38
    xs = range(len(keys))
    for offset, agg, label, color in ((-width / 2, agg_b, "base", "#9aa5b1"), (width / 2, agg_t, "tuned", "#1f6feb")):
        vals = [100 * agg[k]["best"] if k in agg else 0 for k in keys]
        errs = [100 * (agg[k]["best_se"] or 0) if k in agg else 0 for k in keys]
        bars = ax.bar([x + offset for x in xs], vals, width, yerr=errs, capsize=2,
                      error_kw={"elinewidth": 0.8, "ecolor": "#24292f"}, label=label, color=color)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    for x, k in zip(xs, keys):
        ref = agg_t.get(k) or agg_b.get(k)
        if ref and ref.get("chance") is not None:
            ax.hlines(100 * ref["chance"], x - width, x + width, colors="#d1242f", linestyles="--", linewidth=1,
                      label="chance" if x == 0 else None)
    ax.set_xticks(list(xs), [f"{_FAMILY_LABELS.get(f, f)}\n{lang}" for f, lang in keys], fontsize=7)
    ax.set_ylabel("score, best of prompts (%), bars ±1 SE")
    ax.set_ylim(0, 105)
    ax.set_title("NorEval: base vs tuned (best prompt chosen on the test set)")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(*, output_dir: str | Path, base: dict[str, Any] | None, tuned: dict[str, Any] | None,
                 train: dict[str, Any] | None = None, title: str = "fjordtune report") -> dict[str, Any]:
    """Write report.md, scores.png and summary.json (both models' results) into `output_dir`."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot(base, tuned, out / "scores.png")
    table = markdown_table(base, tuned)
    words = noise_words(base, tuned)
    parts = [f"# {title}", "",
             "Scores in points (x100) ± one standard error. *best*: the best of the prompt variants (as the NorEval",
             "dashboard reports), chosen on the test set itself; *mean*: the mean over the variants; *tuned on base's",
             "best prompt* and *change (same prompt)*: both models on the prompt that was best for base, the change",
             f"with a paired SE, marked `{MARK}` when larger than {NOISE_SES:g} SE; `chance`: the expected score of",
             "uniform guessing. docs/evaluation.md, \"Report and noise\", explains every column.", "", table, "",
             words, "", "![scores](scores.png)", ""]
    warnings = [w for r in (base, tuned) if r for w in r.get("warnings", [])]
    if warnings:
        parts += ["## Sanity warnings", ""] + [f"- {w}" for w in warnings] + [""]
    held = held_out_table(train)
    if held:
        parts += ["## Held-out loss", "", "Loss on rows training never saw (data.eval_files / eval_fraction), "
                  "before the first step (base) and after the last (tuned); lower is better.", "", held, ""]
    parts += data_section(train)
    if train:
        parts += ["## Training", ""] + [f"- {k}: {v}" for k, v in train.items()
                                        if k not in ("telemetry", "data")] + [""]
    parts += telemetry_section(train, base, tuned)
    md = out / "report.md"
    md.write_text("\n".join(parts))
    combined = out / "summary.json"
    from fjordtune.eval.run import dumps_results

    combined.write_text(dumps_results({"base": base, "tuned": tuned, "train": train}))
    return {"markdown": md, "png": png, "summary": combined, "table": table, "words": words, "held_out": held}


def data_section(train: dict[str, Any] | None) -> list[str]:
    """The training mixture (rows per source and what each filter removed, the content hash and seed) and the
    contamination check's result. Empty when the run carries no data record."""
    record = (train or {}).get("data")
    if not record:
        return []
    m, c = record.get("manifest") or {}, record.get("contamination") or {}
    out = ["## Training data", ""]
    if c.get("checked"):
        verdict = ("**clean**: no training row contains a NorEval item" if not c.get("hits") else
                   f"**{c['contaminated_rows']} rows contain NorEval items** ({c['hits']} hits); "
                   f"{c.get('note') or 'see <run>/data/contamination.json'}")
        out += [f"Contamination check: {c['train_rows']} source rows against {c['eval_items']} NorEval items "
                f"(every family, written standard and split; normalised substring and word n-gram): {verdict}.", ""]
        for h in c.get("first_hits", []):
            out.append(f"- `{h['train_file']}:{h['train_line']}`: {h['eval_dataset']} {h['eval_config']}/"
                       f"{h['eval_split']} item {h['eval_id']} ({h['field']}, {h['kind']})")
        if c.get("first_hits"):
            out.append("")
    else:
        out += [f"Contamination check: **not run** ({c.get('note', 'no record')}).", ""]
    sources = m.get("sources") or []
    if sources:
        out += [f"Mixture: {m.get('rows')} rows (seed {m.get('seed')}, dedup {m.get('dedup')}, "
                f"{m.get('held_out', 0)} held out), content sha256 `{str(m.get('content_sha256', ''))[:16]}`.", "",
                "| source | asked | read | bad rows skipped | duplicates (exact / normalised) | too short / long "
                "| available | taken |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for s in sources:
            asked = f"count {s['count']}" if s.get("count") is not None else f"weight {s.get('weight') or 1:g}"
            out.append(f"| {s.get('name')} | {asked} | {s.get('read')} | {s.get('bad_rows_skipped')} | "
                       f"{s.get('duplicates_exact')} / {s.get('duplicates_normalised')} | {s.get('too_short')} / "
                       f"{s.get('too_long')} | {s.get('available')} | {s.get('taken')} |")
        out.append("")
    return out


def telemetry_section(train: dict[str, Any] | None, base: dict[str, Any] | None,
                      tuned: dict[str, Any] | None) -> list[str]:
    """Per GPU: utilisation (mean, p5, p95), longest idle stretch, memory against the GPU's total and
    preflight's prediction, and the warnings; for training and each eval. Empty when none was measured."""
    from fjordtune.telemetry.summary import markdown

    blocks = [((train or {}).get("telemetry"), "Training workers")]
    blocks += [((r or {}).get("telemetry"), f"Eval replicas ({name})") for name, r in (("base", base), ("tuned", tuned))]
    tables = [markdown(block, title=title) for block, title in blocks if block]
    if not tables:
        return []
    return ["## GPU telemetry", "", "Sampled every `telemetry.interval_s` in each process (docs/telemetry.md); "
            "utilisation over the working phase (training steps, scoring), memory peaks over the whole run.", "",
            *tables]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _est(e: Estimate | None) -> str:
    if e is None:
        return "-"
    return f"{100 * e.value:.1f}" + ("" if e.se is None else f" ± {100 * e.se:.1f}")


def _best_cell(g: ModelGroup | None) -> str:
    return "-" if g is None else f"{_est(g.best)} ({g.best_prompt})"


def _change_cell(e: Estimate | None) -> str:
    if e is None:
        return "-"
    cell = f"{100 * e.value:+.1f}" + ("" if e.se is None else f" ± {100 * e.se:.1f}")
    return f"{cell} {MARK}" if e.beyond_noise else cell


def _label(key: tuple[str, str]) -> str:
    return f"{_FAMILY_LABELS.get(key[0], key[0])} {key[1]}".rstrip(" -")


def _named_change(key: tuple[str, str], c: Comparison) -> str:
    e = c.same_prompt_change
    assert e is not None and e.num_ses is not None
    if e.se == 0:
        size = "no document changed" if e.value == 0 else "SE 0"
    else:  # two decimals where one would round onto the threshold and contradict the verdict
        size = f"{e.num_ses:.{2 if abs(e.num_ses - NOISE_SES) < 0.05 else 1}f} SE"
    return f"{_label(key)}: {100 * e.value:+.1f} points ({size})"
