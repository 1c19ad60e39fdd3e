"""Base-vs-tuned report: a Markdown table like the story's (best of the prompt variants per task and
language, the mean alongside) and a PNG chart with chance level marked."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

_VARIANT = re.compile(r"^(?P<base>.+)_(?P<lang>nob|nno)_p(?P<k>\d+)$")
_FAMILY_LABELS = {
    "norcommonsenseqa": "NorCommonsenseQA",
    "noropenbookqa": "NorOpenBookQA",
    "nortruthfulqa_mc": "NorTruthfulQA (mc)",
    "nrk_quiz_qa": "NRK-Quiz-QA",
}


def metric_of(entry: dict[str, Any]) -> tuple[str, float] | None:
    """The headline metric of a task: acc_norm where the task defines it, else acc (as NorEval reports)."""
    for m in ("acc_norm", "acc"):
        if m in entry:
            return m, entry[m]
    return None


def aggregate(results: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """{(family, lang): {"best", "mean", "best_prompt", "metric", "n", "chance"}} over prompt variants."""
    groups: dict[tuple[str, str], list[tuple[str, str, float, dict[str, Any]]]] = defaultdict(list)
    for name, entry in results["tasks"].items():
        m = _VARIANT.match(name)
        family, lang, prompt = (m["base"], m["lang"], f"p{m['k']}") if m else (name, "-", "-")
        got = metric_of(entry)
        if got:
            groups[(family, lang)].append((prompt, got[0], got[1], entry))
    out = {}
    for key, rows in sorted(groups.items()):
        best = max(rows, key=lambda r: r[2])
        out[key] = {
            "best": best[2], "best_prompt": best[0], "mean": sum(r[2] for r in rows) / len(rows),
            "metric": best[1], "n": best[3].get("n", 0), "chance": best[3].get("chance"),
            "num_prompts": len(rows),
        }
    return out


def markdown_table(base: dict[str, Any] | None, tuned: dict[str, Any] | None) -> str:
    """One row per task and language: best-of-prompts score of base and tuned, the change, and n."""
    agg_b = aggregate(base) if base else {}
    agg_t = aggregate(tuned) if tuned else {}
    keys = sorted(set(agg_b) | set(agg_t))
    lines = [
        "| task | lang | metric | n | chance | base best (mean) | tuned best (mean) | change |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    col_b, col_t = [], []
    for key in keys:
        b, t = agg_b.get(key), agg_t.get(key)
        ref = t or b
        fam = _FAMILY_LABELS.get(key[0], key[0])
        delta = f"{(t['best'] - b['best']) * 100:+.1f}" if b and t else "-"
        lines.append(
            f"| {fam} | {key[1]} | {ref['metric']} | {ref['n']} | {_pct(ref['chance'])} | "
            f"{_cell(b)} | {_cell(t)} | {delta} |"
        )
        if b:
            col_b.append(b["best"])
        if t:
            col_t.append(t["best"])
    avg_b = _pct(sum(col_b) / len(col_b)) if col_b else "-"
    avg_t = _pct(sum(col_t) / len(col_t)) if col_t else "-"
    lines.append(f"| **average** | | | | | {avg_b} | {avg_t} | |")
    return "\n".join(lines)


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
    """Grouped bars of best-of-prompts scores per task and language, chance marked per group."""
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
        bars = ax.bar([x + offset for x in xs], vals, width, label=label, color=color)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    for x, k in zip(xs, keys):
        ref = agg_t.get(k) or agg_b.get(k)
        if ref and ref.get("chance") is not None:
            ax.hlines(100 * ref["chance"], x - width, x + width, colors="#d1242f", linestyles="--", linewidth=1,
                      label="chance" if x == 0 else None)
    ax.set_xticks(list(xs), [f"{_FAMILY_LABELS.get(f, f)}\n{lang}" for f, lang in keys], fontsize=7)
    ax.set_ylabel("score, best of prompts (%)")
    ax.set_ylim(0, 105)
    ax.set_title("NorEval: base vs tuned")
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
    parts = [f"# {title}", "", "Best of the prompt variants per task and language (mean over variants in brackets),",
             "as the NorEval dashboard reports; `chance` is the expected score of uniform guessing.", "", table, "",
             "![scores](scores.png)", ""]
    warnings = [w for r in (base, tuned) if r for w in r.get("warnings", [])]
    if warnings:
        parts += ["## Sanity warnings", ""] + [f"- {w}" for w in warnings] + [""]
    held = held_out_table(train)
    if held:
        parts += ["## Held-out loss", "", "Loss on rows training never saw (data.eval_files / eval_fraction), "
                  "before the first step (base) and after the last (tuned); lower is better.", "", held, ""]
    if train:
        parts += ["## Training", ""] + [f"- {k}: {v}" for k, v in train.items()] + [""]
    md = out / "report.md"
    md.write_text("\n".join(parts))
    combined = out / "summary.json"
    combined.write_text(json.dumps({"base": base, "tuned": tuned, "train": train}, indent=2, ensure_ascii=False) + "\n")
    return {"markdown": md, "png": png, "summary": combined, "table": table, "held_out": held}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _cell(a: dict[str, Any] | None) -> str:
    return "-" if not a else f"{100 * a['best']:.1f} ({100 * a['mean']:.1f})"
