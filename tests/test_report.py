"""`fjordtune.report` and `fjordtune.eval.stats`: best-of-prompts aggregation, standard errors (per
prompt, mean over prompts, paired same-prompt change), the 2-SE marking, the Markdown table and its
paragraph in words, the PNG chart, and the `fjordtune report` command, on results dicts shaped like
`fjordtune eval`'s results.json (with and without `per_doc`). Every SE is checked against a hand
computation.

Unit tier (matplotlib with the Agg backend; the CLI as one subprocess).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fjordtune.eval.stats import Estimate, compare
from fjordtune.report import aggregate, markdown_table, noise_words, plot, write_report

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


def se_pn(p: float, n: int) -> float:
    """lm-eval's acc_stderr of a proportion, by hand: sqrt(p (1 - p) / (n - 1))."""
    return math.sqrt(p * (1 - p) / (n - 1))


def doc_entry(acc_norm: list[int], *, acc: list[int] | None = None, doc_ids: list[int] | None = None,
              chance: float = 0.25, with_per_doc: bool = True) -> dict[str, Any]:
    """A task entry as `summarize` writes it, from 0/1 correctness per document."""
    n = len(acc_norm)
    acc = acc_norm if acc is None else acc
    entry: dict[str, Any] = {"acc": sum(acc) / n, "acc_norm": sum(acc_norm) / n, "n": n, "chance": chance}
    entry["acc_stderr"], entry["acc_norm_stderr"] = se_pn(entry["acc"], n), se_pn(entry["acc_norm"], n)
    if with_per_doc:
        entry["per_doc"] = {"doc_id": doc_ids or list(range(n)), "acc": acc, "acc_norm": acc_norm}
    return entry


def row_of(table: str, label: str, lang: str) -> list[str]:
    return next(r for r in table_rows(table) if r[:2] == [label, lang])


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
    """Results without per_doc (as older results.json): SEs from p and n, the change on base's best prompt."""
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
    for fam_label, lang, metric, b_best, b_mean, t_best, t_mean, t_same, change, n, chance in body:
        key = (labels[fam_label], lang)
        assert metric == ("acc" if key[0] == "nortruthfulqa_mc" else "acc_norm")
        assert int(n) == N[key]
        assert float(chance) == pytest.approx(100 * CHANCE[key[0]], abs=0.05)
        b, t = agg_b[key], agg_t[key]
        assert b_best == f"{100 * b['best']:.1f} ± {100 * se_pn(b['best'], N[key]):.1f} ({b['best_prompt']})"
        assert t_best == f"{100 * t['best']:.1f} ± {100 * se_pn(t['best'], N[key]):.1f} ({t['best_prompt']})"
        assert b_mean.startswith(f"{100 * b['mean']:.1f} ± ") and t_mean.startswith(f"{100 * t['mean']:.1f} ± ")
        on_same = tuned["tasks"][f"{key[0]}_{lang}_p3"][metric]  # p3 is base's best everywhere
        assert t_same == f"{100 * on_same:.1f} ± {100 * se_pn(on_same, N[key]):.1f}"
        # no per_doc: the change's SE is the unpaired one
        se = math.hypot(se_pn(b["best"], N[key]), se_pn(on_same, N[key]))
        assert change.split(" ± ")[0] == f"{100 * (on_same - b['best']):+.1f}"
        assert change.split(" ± ")[1].rstrip(" *") == f"{100 * se:.1f}"
        assert change.endswith("*") == (abs(on_same - b["best"]) > 2 * se)
    assert next(r for r in body if r[:2] == ["NorCommonsenseQA", "nob"])[8].startswith("+3.7 ± ")
    # tuned's own best there is p1 (p3 fell to 0.10); the same-prompt column still uses p3
    obqa_nno = next(r for r in body if r[:2] == ["NorOpenBookQA", "nno"])
    assert obqa_nno[5].endswith("(p1)") and obqa_nno[7].startswith("10.0 ± ")
    assert obqa_nno[8].startswith("-38.0 ± ") and obqa_nno[8].endswith(" *")
    assert avg[0] == "**average**"
    mean_b = sum(a["best"] for a in agg_b.values()) / len(agg_b)
    mean_t = sum(a["best"] for a in agg_t.values()) / len(agg_t)
    assert avg[3] == f"{100 * mean_b:.1f}" and avg[5] == f"{100 * mean_t:.1f}"
    assert avg[4] == f"{100 * sum(a['mean'] for a in agg_b.values()) / len(agg_b):.1f}"


def test_table_with_one_model_only() -> None:
    rows = table_rows(markdown_table(make_results(), None))
    assert len(rows) == 9
    for row in rows[:-1]:
        assert row[5:9] == ["-", "-", "-", "-"]
        assert row[3] != "-" and row[4] != "-"
    rows = table_rows(markdown_table(None, make_results()))
    assert all(row[3] == row[4] == row[7] == row[8] == "-" for row in rows[:-1])
    assert rows[-1][3] == "-" and rows[-1][5] != "-"
    assert "no change to judge" in noise_words(make_results(), None)


def test_table_with_different_task_sets() -> None:
    base = make_results(families=["nrk_quiz_qa"])
    tuned = make_results(0.01, families=["nrk_quiz_qa", "noropenbookqa"])
    rows = table_rows(markdown_table(base, tuned))
    assert len(rows) == 5
    obqa = [r for r in rows if r[0] == "NorOpenBookQA"]
    assert obqa and all(r[3] == "-" and r[8] == "-" for r in obqa)
    nrk = [r for r in rows if r[0] == "NRK-Quiz-QA"]
    assert all(r[8].startswith("+1.0 ± ") for r in nrk)


# -- standard errors from per-document results (hand computations) --------------------------------

def test_prompt_se_from_per_doc_is_lm_evals_acc_stderr() -> None:
    from lm_eval.api.metrics import mean_stderr

    results = {"tasks": {"nrk_quiz_qa_nob_p0": doc_entry([1, 1, 1, 0])}}
    a = aggregate(results)[("nrk_quiz_qa", "nob")]
    # p = 0.75, n = 4: sqrt(0.75 * 0.25 / 3) = 0.25
    assert a["best"] == 0.75 and a["best_se"] == pytest.approx(0.25)
    assert a["best_se"] == pytest.approx(mean_stderr([1, 1, 1, 0]))


def five_prompts() -> dict[str, Any]:
    vectors = [[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0], [1, 1, 0, 1]]
    return {"tasks": {f"nrk_quiz_qa_nob_p{k}": doc_entry(v) for k, v in enumerate(vectors)}}


def test_mean_over_prompts_se_uses_the_shared_documents() -> None:
    a = aggregate(five_prompts())[("nrk_quiz_qa", "nob")]
    # per-document mean over the 5 prompts: [1, .8, .4, .2]; mean .6;
    # sample variance (.16 + .04 + .04 + .16) / 3; SE sqrt(var / 4)
    assert a["mean"] == pytest.approx(0.6)
    assert a["mean_se"] == pytest.approx(math.sqrt(0.4 / 3 / 4))  # 0.1826
    independent = math.sqrt(3 * se_pn(0.5, 4) ** 2 + 2 * se_pn(0.75, 4) ** 2) / 5  # 0.1225: would understate
    assert a["mean_se"] > independent * 1.4
    assert a["best_prompt"] == "p3" and a["best_se"] == pytest.approx(0.25)  # p3 and p4 tie: the first


def test_mean_se_without_per_doc_is_the_mean_of_the_prompt_ses() -> None:
    results = five_prompts()
    for entry in results["tasks"].values():
        del entry["per_doc"]
    a = aggregate(results)[("nrk_quiz_qa", "nob")]
    assert a["mean"] == pytest.approx(0.6)
    assert a["mean_se"] == pytest.approx((3 * se_pn(0.5, 4) + 2 * se_pn(0.75, 4)) / 5)  # the correlated bound


def ten_docs() -> tuple[dict[str, Any], dict[str, Any]]:
    """Base best on p3 (.5); tuned best on p1 (.9) but .8 on p3."""
    def ones(k: int) -> list[int]:
        return [1] * k + [0] * (10 - k)

    base = {"tasks": {f"noropenbookqa_nno_p{k}": doc_entry(ones(c)) for k, c in enumerate([1, 2, 3, 5, 4])}}
    tuned = {"tasks": {f"noropenbookqa_nno_p{k}": doc_entry(ones(c)) for k, c in enumerate([1, 9, 3, 8, 4])}}
    return base, tuned


def test_same_prompt_uses_bases_best_prompt_and_a_paired_se() -> None:
    base, tuned = ten_docs()
    c = compare(base, tuned)[("noropenbookqa", "nno")]
    assert c.base.best_prompt == "p3" and c.tuned.best_prompt == "p1"
    assert c.same_prompt == "p3" and c.tuned_on_same_prompt.value == pytest.approx(0.8)
    # per-document differences on p3: seven 0s and three 1s; mean .3, variance 2.1 / 9, SE sqrt(var / 10)
    assert c.same_prompt_change.value == pytest.approx(0.3)
    assert c.same_prompt_change.se == pytest.approx(math.sqrt(2.1 / 9 / 10))  # 0.1528
    assert c.same_prompt_change.paired
    assert not c.same_prompt_change.beyond_noise  # 1.96 SE
    # best vs best: .9 - .5, unpaired SE of the two chosen prompts
    assert c.best_change.value == pytest.approx(0.4)
    assert c.best_change.se == pytest.approx(math.hypot(se_pn(0.5, 10), se_pn(0.9, 10)))
    row = row_of(markdown_table(base, tuned), "NorOpenBookQA", "nno")
    assert row[3] == f"50.0 ± {100 * se_pn(0.5, 10):.1f} (p3)" and row[5] == f"90.0 ± {100 * se_pn(0.9, 10):.1f} (p1)"
    assert row[7] == f"80.0 ± {100 * se_pn(0.8, 10):.1f}"
    assert row[8] == "+30.0 ± 15.3"  # not +40.0 (best vs best), and no marker


@pytest.mark.parametrize(("value", "marked"), [(0.2001, True), (0.2, False), (0.1999, False), (-0.2001, True),
                                                (-0.1999, False)])
def test_beyond_noise_is_strictly_more_than_two_se(value: float, marked: bool) -> None:
    assert Estimate(value=value, se=0.1).beyond_noise is marked
    assert not Estimate(value=value, se=None).beyond_noise


def marking_results() -> tuple[dict[str, Any], dict[str, Any]]:
    """Three tasks: the same +-10 points, on 100 documents (3.3 paired SE) and on 10 (1.0 SE)."""
    def vec(n: int, k: int) -> list[int]:
        return [1] * k + [0] * (n - k)

    base = {"tasks": {"nrk_quiz_qa_nob_p0": doc_entry(vec(100, 50)), "nrk_quiz_qa_nno_p0": doc_entry(vec(10, 5)),
                      "norcommonsenseqa_nob_p0": doc_entry(vec(100, 60))}}
    tuned = {"tasks": {"nrk_quiz_qa_nob_p0": doc_entry(vec(100, 60)), "nrk_quiz_qa_nno_p0": doc_entry(vec(10, 6)),
                       "norcommonsenseqa_nob_p0": doc_entry(vec(100, 50))}}
    return base, tuned


def test_marker_follows_the_se_not_the_size_of_the_change() -> None:
    base, tuned = marking_results()
    table = markdown_table(base, tuned)
    big, small = row_of(table, "NRK-Quiz-QA", "nob"), row_of(table, "NRK-Quiz-QA", "nno")
    worse = row_of(table, "NorCommonsenseQA", "nob")
    # 100 docs, ten flipped 0 -> 1: differences ten 1s, ninety 0s; variance 9 / 99; SE sqrt(var / 100) = 3.0 points
    assert big[8] == f"+10.0 ± {100 * math.sqrt(9 / 99 / 100):.1f} *"
    assert worse[8] == f"-10.0 ± {100 * math.sqrt(9 / 99 / 100):.1f} *"
    # 10 docs, one flipped: variance .9 / 9; SE sqrt(var / 10) = 10 points: 1.0 SE, not marked
    assert small[8] == "+10.0 ± 10.0"
    # the unpaired SE would not have marked the 100-document change: the paired one must be used
    assert 0.1 < 2 * math.hypot(se_pn(0.5, 100), se_pn(0.6, 100))


def test_words_name_the_changes_beyond_and_within_noise() -> None:
    base, tuned = marking_results()
    words = noise_words(base, tuned)
    beyond, rest = words.split("Within noise:")
    within = rest.split(". ")[0]
    assert "NRK-Quiz-QA nob: +10.0 points (3.3 SE)" in beyond
    assert "NorCommonsenseQA nob: -10.0 points (3.3 SE)" in beyond
    assert "NRK-Quiz-QA nno" not in beyond
    assert "NRK-Quiz-QA nno: +10.0 points (1.0 SE)" in within
    assert "test set" in words and "unpaired" not in words.split("Best-of-5")[0]
    assert "NorOpenBookQA nno: +30.0 points (1.96 SE)" in noise_words(*ten_docs())  # not "2.0 SE" and within
    same = noise_words(base, base)
    assert "larger than 2 SE: none" in same and "NRK-Quiz-QA nob: +0.0 points (no document changed)" in same


def test_old_results_without_per_doc_still_render_with_unpaired_ses() -> None:
    base, tuned = ten_docs()
    for entry in tuned["tasks"].values():
        del entry["per_doc"]
    tuned["tasks"]["noropenbookqa_nno_p3"]["acc_norm_stderr"] = 0.05  # lm-eval's own number is used as given
    c = compare(base, tuned)[("noropenbookqa", "nno")]
    assert not c.same_prompt_change.paired
    assert c.same_prompt_change.se == pytest.approx(math.hypot(se_pn(0.5, 10), 0.05))
    # neither SE field nor per_doc: sqrt(p (1 - p) / (n - 1))
    for entry in tuned["tasks"].values():
        entry.pop("acc_norm_stderr"), entry.pop("acc_stderr")
    assert compare(base, tuned)[("noropenbookqa", "nno")].tuned.best.se == pytest.approx(se_pn(0.9, 10))
    table = markdown_table(base, tuned)
    assert row_of(table, "NorOpenBookQA", "nno")[8] == f"+30.0 ± {100 * math.hypot(se_pn(0.5, 10), se_pn(0.8, 10)):.1f}"
    assert "unpaired" in noise_words(base, tuned) and "NorOpenBookQA nno" in noise_words(base, tuned)


def test_summarize_keeps_per_doc_from_lm_eval_samples() -> None:
    """lm-eval 0.4.13's sample dicts (evaluator.py: doc_id, filter, one key per metric, floats), unsorted."""
    from fjordtune.eval.run import dumps_results, summarize

    values = {3: (1.0, 0.0), 0: (0.0, 1.0), 2: (1.0, 1.0), 1: (0.0, 0.0)}
    samples = [{"doc_id": d, "doc": {"q": "?"}, "filter": "none", "metrics": ["acc", "acc_norm"], "acc": a,
                "acc_norm": an, "resps": [[(-1.0, False)]]} for d, (a, an) in values.items()]
    raw = {"results": {"t_nob_p0": {"acc,none": 0.5, "acc_stderr,none": se_pn(0.5, 4), "acc_norm,none": 0.5}},
           "n-samples": {"t_nob_p0": {"effective": 4}}, "samples": {"t_nob_p0": samples}}
    res = summarize(raw, {"t_nob_p0": object()}, chance_fn=lambda task: 0.25)
    per_doc = res["tasks"]["t_nob_p0"]["per_doc"]
    assert per_doc == {"doc_id": [0, 1, 2, 3], "acc": [0, 0, 1, 1], "acc_norm": [1, 0, 1, 0]}
    assert all(type(v) is int for v in per_doc["acc"])
    assert sum(per_doc["acc"]) / 4 == res["tasks"]["t_nob_p0"]["acc"]
    del raw["samples"]
    assert "per_doc" not in summarize(raw, {"t_nob_p0": object()}, chance_fn=lambda task: 0.25)["tasks"]["t_nob_p0"]
    text = dumps_results(res)
    assert json.loads(text) == res
    assert '"acc": [0, 0, 1, 1]' in text  # a list of numbers stays on one line
    json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))


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


def test_plot_draws_the_se_as_error_bars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.axes

    seen: list[dict[str, Any]] = []
    bar = matplotlib.axes.Axes.bar

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return bar(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", spy)
    base, tuned = ten_docs()
    assert_valid_png(plot(base, tuned, tmp_path / "scores.png"))
    assert [k["label"] for k in seen] == ["base", "tuned"]
    assert seen[0]["yerr"] == pytest.approx([100 * se_pn(0.5, 10)])
    assert seen[1]["yerr"] == pytest.approx([100 * se_pn(0.9, 10)])


def test_write_report_files(tmp_path: Path) -> None:
    base, tuned = make_results(), make_results(0.02)
    tuned["warnings"] = ["nrk_quiz_qa_nob_p0: acc 0.200 is at or below chance"]
    paths = write_report(output_dir=tmp_path / "out", base=base, tuned=tuned, train={"steps": 12, "final_loss": 1.5},
                         title="unit report")
    md = (tmp_path / "out" / "report.md").read_text()
    assert paths["markdown"] == tmp_path / "out" / "report.md"
    assert md.startswith("# unit report")
    assert paths["table"] in md and "![scores](scores.png)" in md
    assert paths["words"] == noise_words(base, tuned) and paths["words"] in md
    assert md.index(paths["table"]) < md.index(paths["words"]) < md.index("![scores]")
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
    base, tuned = marking_results()
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "tuned.json").write_text(json.dumps(tuned))
    out = tmp_path / "report"
    res = run_cli("report", "--base", str(tmp_path / "base.json"), "--tuned", str(tmp_path / "tuned.json"),
                  "--output-dir", str(out))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "scores.png", "summary.json"]
    assert markdown_table(base, tuned) in (out / "report.md").read_text()
    assert markdown_table(base, tuned) in res.stdout
    assert noise_words(base, tuned) in res.stdout and "+10.0 ± 3.0 *" in res.stdout
    assert_valid_png(out / "scores.png")
    assert json.loads((out / "summary.json").read_text())["tuned"] == tuned


def test_cli_report_bad_input(tmp_path: Path) -> None:
    res = run_cli("report", "--output-dir", str(tmp_path / "o"))
    assert res.returncode == 2 and "Traceback" not in res.stderr and "error: " in res.stderr
    (tmp_path / "broken.json").write_text("{not json")
    res = run_cli("report", "--base", str(tmp_path / "broken.json"), "--output-dir", str(tmp_path / "o"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert str(tmp_path / "broken.json") in res.stderr
