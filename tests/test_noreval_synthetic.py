"""The synthetic NorEval-format sets (`fjordtune.eval.synthetic`): the bundled samples' schema, the real
test sets' sizes, byte-identical output for a seed, and lm-eval building the tasks from them.

No Ray; the lm-eval test builds one TaskManager for the module (7-18 s).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fjordtune.eval.noreval import FAMILIES, LANGUAGES, SAMPLE_DATA_DIR
from fjordtune.eval.synthetic import FULL_ROWS, num_rows, num_scored_docs, write_synthetic_noreval

SMALL = 0.02
# Words of one written standard only (as in test_noreval_samples.py)
BOKMAL_ONLY = {"ikke", "hva", "hvem", "hvor", "hvordan", "hvorfor", "hvilken", "hvilket", "jeg", "fra", "mye", "noen"}
NYNORSK_ONLY = {"ikkje", "kva", "kven", "kvar", "korleis", "kvifor", "eg", "frå", "mykje", "nokon", "ein", "eit"}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def shape(value: Any) -> Any:
    """The type structure of a JSON value: dict keys in order, the element type of lists."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [sorted({type(v).__name__ for v in value})]
    return type(value).__name__


def choice_texts(row: dict[str, Any]) -> list[str]:
    return row["mc1_targets"]["choices"] if "mc1_targets" in row else row["choices"]["text"]


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic-full")
    write_synthetic_noreval(out)
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic-small")
    write_synthetic_noreval(out, scale=SMALL)
    return out


def test_same_files_and_row_schema_as_the_bundled_samples(small):
    samples = sorted(p.relative_to(SAMPLE_DATA_DIR) for p in SAMPLE_DATA_DIR.rglob("*.jsonl"))
    assert sorted(p.relative_to(small) for p in small.rglob("*.jsonl")) == samples
    for rel in samples:
        expected = {json.dumps(shape(r)) for r in read_jsonl(SAMPLE_DATA_DIR / rel)}
        assert len(expected) == 1, rel  # the samples agree among themselves
        got = {json.dumps(shape(r)) for r in read_jsonl(small / rel)}
        assert got == expected, rel


def test_full_size_is_the_real_test_sets():
    assert num_scored_docs() == {
        "norcommonsenseqa_nob": 998, "norcommonsenseqa_nno": 95, "noropenbookqa_nob": 374, "noropenbookqa_nno": 90,
        "nortruthfulqa_mc_nob": 488, "nortruthfulqa_mc_nno": 57, "nrk_quiz_qa_nob": 3600, "nrk_quiz_qa_nno": 1330,
    }
    assert sum(num_scored_docs().values()) * 5 == 35_160
    assert num_rows("noropenbookqa", "nb", "test") == 376


def test_sizes_at_a_small_scale(small):
    for (family, config, split), rows in FULL_ROWS.items():
        path = small / FAMILIES[family].dataset_id / config / f"{split}.jsonl"
        assert len(read_jsonl(path)) == num_rows(family, config, split, scale=SMALL) == max(
            1 if split == FAMILIES[family].scored_split else 5, round(rows * SMALL)
        )
    docs = num_scored_docs(scale=SMALL)
    assert docs["nrk_quiz_qa_nob"] == 72 and docs["noropenbookqa_nob"] == 8 - 1  # row 2 has an empty fact


def test_full_size_rows_are_well_formed(full):
    for (family, config, split), count in FULL_ROWS.items():
        rows = read_jsonl(full / FAMILIES[family].dataset_id / config / f"{split}.jsonl")
        assert len(rows) == count
        assert len({r["id"] for r in rows}) == count
        questions = [r.get("question") or r["question_stem"] for r in rows]
        assert len(set(questions)) == count, f"{family}/{config}/{split}: a question repeats"
        assert 8 <= sum(len(q.split()) for q in questions) / count <= 25
        foreign = NYNORSK_ONLY if config == "nb" else BOKMAL_ONLY
        for row in rows:
            texts = choice_texts(row)
            assert len(set(texts)) == len(texts) and all(t.strip() for t in texts)
            if family == "nortruthfulqa_mc":
                assert 2 <= len(texts) <= 10 and row["mc1_targets"]["labels"] == [1] + [0] * (len(texts) - 1)
            else:
                assert len(texts) == {"norcommonsenseqa": 5, "noropenbookqa": 4}.get(family, len(texts))
                assert 3 <= len(texts) <= 5 and row["choices"]["label"] == list("ABCDE")[: len(texts)]
                assert row["answer"] in row["choices"]["label"]
            words = set(re.findall(r"[a-zæøå]+", " ".join([row.get("question") or row["question_stem"], *texts,
                                                             row.get("fact", "")]).lower()))
            assert not words & foreign, (family, config, row["id"], sorted(words & foreign))
        if family == "noropenbookqa":
            assert sum(r["fact"] == "" for r in rows) == (2 if (config, split) == ("nb", "test") else 0)
        if family != "nortruthfulqa_mc":  # gold answers spread over the positions
            answers = [r["answer"] for r in rows]
            assert len(set(answers)) >= 3


def test_deterministic_and_prefix_of_the_full_size(tmp_path, small, full):
    again = tmp_path / "again"
    write_synthetic_noreval(again, scale=SMALL)
    other = tmp_path / "other-seed"
    write_synthetic_noreval(other, scale=SMALL, seed=1)
    for path in small.rglob("*.jsonl"):
        rel = path.relative_to(small)
        assert (again / rel).read_bytes() == path.read_bytes(), rel
        assert (other / rel).read_bytes() != path.read_bytes(), rel
        assert (full / rel).read_bytes().startswith(path.read_bytes()), rel


def test_cli(tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run([sys.executable, "-m", "fjordtune.eval.synthetic", str(out), "--scale", "0.01"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert "scored documents per prompt: " in res.stdout
    assert len(read_jsonl(out / "ltg/nrk_quiz_qa/nn/test.jsonl")) == 13
    bad = subprocess.run([sys.executable, "-m", "fjordtune.eval.synthetic", str(out), "--scale", "2"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "scale must be in (0, 1]" in bad.stderr
    helped = subprocess.run([sys.executable, "-m", "fjordtune.eval.synthetic", "--help"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert helped.returncode == 0 and "--scale" in helped.stdout


def test_lm_eval_builds_one_task_per_family_and_language(small):
    pytest.importorskip("lm_eval")
    from fjordtune.eval.noreval import build_task_dict
    from fjordtune.eval.run import task_manager

    names = [f"{family}_{lang}_p{(i + j) % 5}" for i, family in enumerate(FAMILIES) for j, lang in enumerate(LANGUAGES)]
    tasks = build_task_dict(names, small, task_manager=task_manager())["tasks"]
    docs = num_scored_docs(scale=SMALL)
    for name, task in tasks.items():
        pair = name.rsplit("_", 1)[0]
        assert len(task.eval_docs) == docs[pair], name
        for doc in task.eval_docs:
            assert len(task.doc_to_choice(doc)) == len(choice_texts(doc)), name
            assert task.doc_to_text(doc).strip()
