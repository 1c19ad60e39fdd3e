"""`fjordtune.report`: best-of-prompts aggregation, the Markdown table, the PNG chart, and the
`fjordtune report` command, on results dicts shaped like `fjordtune eval`'s results.json.

Unit tier (matplotlib with the Agg backend; the CLI as one subprocess).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fjordtune.report import aggregate, markdown_table, plot, write_report

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAMILIES = ["norcommonsenseqa", "noropenbookqa", "nortruthfulqa_mc", "nrk_quiz_qa"]
LANGS = ["nob", "nno"]
CHANCE = {"norcommonsenseqa": 0.2, "noropenbookqa": 0.25, "nortruthfulqa_mc": 0.2134, "nrk_quiz_qa": 0.2741}
N = {("norcommonsenseqa", "nob"): 998, ("norcommonsenseqa", "nno"): 95, ("noropenbookqa", "nob"): 376,
     ("noropenbookqa", "nno"): 90, ("nortruthfulqa_mc", "nob"): 488, ("nortruthfulqa_mc", "nno"): 57,
     ("nrk_quiz_qa", "nob"): 3600, ("nrk_quiz_qa", "nno"): 1330}


def headline(family: str, lang: str, k: int, shift: float) -> float:
    """A distinct score per (family, lang, prompt) so a wrong grouping cannot give the right numbers."""
    fi, li = FAMILIES.index(family), LANGS.index(lang)
    return round(0.30 + 0.05 * fi + 0.02 * li + [0.01, 0.07, 0.03, 0.11, 0.05][k] + shift, 4)


def make_results(shift: float = 0.0, *, families: list[str] = FAMILIES) -> dict[str, Any]:
    tasks: dict[str, Any] = {}
    for family in families:
        for lang in LANGS:
            for k in range(5):
                score = headline(family, lang, k, shift)
                entry: dict[str, Any] = {"n": N[(family, lang)], "chance": CHANCE[family]}
                if family == "nortruthfulqa_mc":
                    entry["acc"] = score  # TruthfulQA-mc defines acc only
                else:
                    entry["acc_norm"] = score
                    # acc is sometimes higher than acc_norm (prompt p0 here): it must still not be used
                    entry["acc"] = round(score + (0.2 if k == 0 else -0.1), 4)
                tasks[f"{family}_{lang}_p{k}"] = entry
    return {"model": "test", "tasks": tasks, "warnings": []}


def expected_best(family: str, lang: str, shift: float = 0.0) -> float:
    return max(headline(family, lang, k, shift) for k in range(5))


def expected_mean(family: str, lang: str, shift: float = 0.0) -> float:
    return sum(headline(family, lang, k, shift) for k in range(5)) / 5


def table_rows(table: str) -> list[list[str]]:
    lines = table.strip().splitlines()
    assert lines[1].startswith("|---"), "second line is the Markdown header separator"
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[2:]]


# -- aggregate ---------------------------------------------------------------------------------------

def test_aggregate_best_and_mean_over_prompts() -> None:
    agg = aggregate(make_results())
    assert set(agg) == {(f, lang) for f in FAMILIES for lang in LANGS}
    for (family, lang), a in agg.items():
        assert a["best"] == pytest.approx(expected_best(family, lang))
        assert a["mean"] == pytest.approx(expected_mean(family, lang))
        assert a["best_prompt"] == "p3"  # the +0.11 prompt
        assert a["num_prompts"] == 5
        assert a["n"] == N[(family, lang)]
        assert a["chance"] == CHANCE[family]


def test_aggregate_prefers_acc_norm_and_uses_acc_for_truthfulqa() -> None:
    agg = aggregate(make_results())
    for lang in LANGS:
        assert agg[("nortruthfulqa_mc", lang)]["metric"] == "acc"
        for family in ("norcommonsenseqa", "noropenbookqa", "nrk_quiz_qa"):
            # p0's acc is the highest number anywhere in its group; taking it would change best
            assert agg[(family, lang)]["metric"] == "acc_norm"
            assert agg[(family, lang)]["best"] < make_results()["tasks"][f"{family}_{lang}_p0"]["acc"]


def test_aggregate_best_prompt_follows_the_data() -> None:
    results = make_results()
    results["tasks"]["nrk_quiz_qa_nno_p4"]["acc_norm"] = 0.99
    agg = aggregate(results)
    assert agg[("nrk_quiz_qa", "nno")]["best"] == 0.99
    assert agg[("nrk_quiz_qa", "nno")]["best_prompt"] == "p4"
    assert agg[("nrk_quiz_qa", "nob")]["best_prompt"] == "p3"


def test_aggregate_partial_prompts_and_unrelated_tasks() -> None:
    results = {"tasks": {
        "nrk_quiz_qa_nob_p0": {"acc": 0.4, "acc_norm": 0.5, "n": 10, "chance": 0.25},
        "nrk_quiz_qa_nob_p2": {"acc": 0.6, "acc_norm": 0.3, "n": 10, "chance": 0.25},
        "some_other_task": {"acc": 0.7, "n": 5, "chance": None},
        "no_metric_task": {"n": 3, "chance": None},
    }}
    agg = aggregate(results)
    assert agg[("nrk_quiz_qa", "nob")]["best"] == 0.5
    assert agg[("nrk_quiz_qa", "nob")]["mean"] == pytest.approx(0.4)
    assert agg[("nrk_quiz_qa", "nob")]["num_prompts"] == 2
    assert agg[("some_other_task", "-")]["best"] == 0.7
    assert not any(key[0] == "no_metric_task" for key in agg)


# -- the Markdown table ------------------------------------------------------------------------------

def test_table_rows_and_change_column() -> None:
    base, tuned = make_results(0.0), make_results(0.037)
    tuned["tasks"]["noropenbookqa_nno_p3"]["acc_norm"] = 0.10  # tuned is worse on one row
    table = markdown_table(base, tuned)
    rows = table_rows(table)
    assert len(rows) == len(FAMILIES) * len(LANGS) + 1
    body, avg = rows[:-1], rows[-1]
    assert {(r[0], r[1]) for r in body} == {
        (label, lang) for label in ("NorCommonsenseQA", "NorOpenBookQA", "NorTruthfulQA (mc)", "NRK-Quiz-QA")
        for lang in LANGS
    }
    agg_b, agg_t = aggregate(base), aggregate(tuned)
    labels = {"NorCommonsenseQA": "norcommonsenseqa", "NorOpenBookQA": "noropenbookqa",
              "NorTruthfulQA (mc)": "nortruthfulqa_mc", "NRK-Quiz-QA": "nrk_quiz_qa"}
    for fam_label, lang, metric, n, chance, b_cell, t_cell, change in body:
        key = (labels[fam_label], lang)
        assert metric == ("acc" if key[0] == "nortruthfulqa_mc" else "acc_norm")
        assert int(n) == N[key]
        assert float(chance) == pytest.approx(100 * CHANCE[key[0]], abs=0.05)
        assert b_cell == f"{100 * agg_b[key]['best']:.1f} ({100 * agg_b[key]['mean']:.1f})"
        assert t_cell == f"{100 * agg_t[key]['best']:.1f} ({100 * agg_t[key]['mean']:.1f})"
        assert float(change) == pytest.approx(100 * (agg_t[key]["best"] - agg_b[key]["best"]), abs=0.05)
        assert change[0] in "+-", "the change carries its sign"
    assert next(r for r in body if r[:2] == ["NorCommonsenseQA", "nob"])[7] == "+3.7"
    # p3 fell to 0.10 so p1 is tuned's best there: 0.30+0.05+0.02+0.07+0.037 vs base 0.30+0.05+0.02+0.11
    assert next(r for r in body if r[:2] == ["NorOpenBookQA", "nno"])[7] == "-0.3"
    assert avg[0] == "**average**"
    mean_b = sum(a["best"] for a in agg_b.values()) / len(agg_b)
    mean_t = sum(a["best"] for a in agg_t.values()) / len(agg_t)
    assert avg[5] == f"{100 * mean_b:.1f}" and avg[6] == f"{100 * mean_t:.1f}"


def test_table_with_one_model_only() -> None:
    rows = table_rows(markdown_table(make_results(), None))
    assert len(rows) == 9
    for row in rows[:-1]:
        assert row[6] == "-" and row[7] == "-"
        assert row[5] != "-"
    rows = table_rows(markdown_table(None, make_results()))
    assert all(row[5] == "-" and row[7] == "-" for row in rows[:-1])
    assert rows[-1][5] == "-" and rows[-1][6] != "-"


def test_table_with_different_task_sets() -> None:
    base = make_results(families=["nrk_quiz_qa"])
    tuned = make_results(0.01, families=["nrk_quiz_qa", "noropenbookqa"])
    rows = table_rows(markdown_table(base, tuned))
    assert len(rows) == 5
    obqa = [r for r in rows if r[0] == "NorOpenBookQA"]
    assert obqa and all(r[5] == "-" and r[7] == "-" for r in obqa)
    nrk = [r for r in rows if r[0] == "NRK-Quiz-QA"]
    assert all(r[7] == "+1.0" for r in nrk)


# -- the PNG -----------------------------------------------------------------------------------------

def assert_valid_png(path: Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, "not a PNG file"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0
    assert image.std() > 0, "the chart is a blank image"


@pytest.mark.parametrize("which", ["both", "base", "tuned"])
def test_plot_writes_valid_png(tmp_path: Path, which: str) -> None:
    base = make_results() if which in ("both", "base") else None
    tuned = make_results(0.05) if which in ("both", "tuned") else None
    path = plot(base, tuned, tmp_path / "sub" / "scores.png")
    assert path == tmp_path / "sub" / "scores.png"
    assert_valid_png(path)


def test_write_report_files(tmp_path: Path) -> None:
    base, tuned = make_results(), make_results(0.02)
    tuned["warnings"] = ["nrk_quiz_qa_nob_p0: acc 0.200 is at or below chance"]
    paths = write_report(output_dir=tmp_path / "out", base=base, tuned=tuned, train={"steps": 12, "final_loss": 1.5},
                         title="unit report")
    md = (tmp_path / "out" / "report.md").read_text()
    assert paths["markdown"] == tmp_path / "out" / "report.md"
    assert md.startswith("# unit report")
    assert paths["table"] in md and "![scores](scores.png)" in md
    assert "## Sanity warnings" in md and tuned["warnings"][0] in md
    assert "- steps: 12" in md
    assert_valid_png(tmp_path / "out" / "scores.png")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary == {"base": base, "tuned": tuned, "train": {"steps": 12, "final_loss": 1.5}}


def test_write_report_without_warnings_has_no_warning_section(tmp_path: Path) -> None:
    write_report(output_dir=tmp_path, base=make_results(), tuned=make_results(0.01))
    assert "Sanity warnings" not in (tmp_path / "report.md").read_text()


# -- the CLI -----------------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "fjordtune", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_report(tmp_path: Path) -> None:
    base, tuned = make_results(), make_results(0.03)
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "tuned.json").write_text(json.dumps(tuned))
    out = tmp_path / "report"
    res = run_cli("report", "--base", str(tmp_path / "base.json"), "--tuned", str(tmp_path / "tuned.json"),
                  "--output-dir", str(out))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "scores.png", "summary.json"]
    assert markdown_table(base, tuned) in (out / "report.md").read_text()
    assert markdown_table(base, tuned) in res.stdout
    assert_valid_png(out / "scores.png")
    assert json.loads((out / "summary.json").read_text())["tuned"] == tuned


def test_cli_report_bad_input(tmp_path: Path) -> None:
    res = run_cli("report", "--output-dir", str(tmp_path / "o"))
    assert res.returncode == 2 and "Traceback" not in res.stderr and "error: " in res.stderr
    (tmp_path / "broken.json").write_text("{not json")
    res = run_cli("report", "--base", str(tmp_path / "broken.json"), "--output-dir", str(tmp_path / "o"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert str(tmp_path / "broken.json") in res.stderr
