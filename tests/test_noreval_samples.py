"""The bundled NorEval-format samples, the local-file task builder, and the demo tokenizer.

Uses the real lm-eval 0.4.13 task registry (one TaskManager for the module: it takes 7-18 s to
build) and the real tokenizer files; nothing is downloaded.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fjordtune.errors import UserError
from fjordtune.eval.noreval import (
    FAMILIES,
    LANGUAGES,
    SAMPLE_DATA_DIR,
    NorEvalDataMissing,
    build_task_dict,
    chance_level,
    local_task_config,
    parse_task_name,
    task_names,
)

pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "src" / "fjordtune" / "assets" / "tokenizer"
SFT_SAMPLE = REPO / "src" / "fjordtune" / "samples" / "sft" / "demo.jsonl"

# Column order and types of the real datasets (their Hugging Face dataset cards).
SCHEMAS = {
    "norcommonsenseqa": ("id", "question", "choices", "answer", "curated"),
    "noropenbookqa": ("id", "question_stem", "choices", "answer", "fact", "curated"),
    "nortruthfulqa_mc": ("id", "question", "mc1_targets", "curated"),
    "nrk_quiz_qa": ("id", "question", "choices", "answer", "quiz", "curated"),
}
# Words that belong to one written standard only, to catch a Bokmål sentence in the Nynorsk files.
BOKMAL_ONLY = {"ikke", "hva", "hvem", "hvor", "hvordan", "hvorfor", "hvilken", "hvilket", "jeg", "fra", "mye", "noen"}
NYNORSK_ONLY = {"ikkje", "kva", "kven", "kvar", "korleis", "kvifor", "eg", "frå", "mykje", "nokon", "ein", "eit"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def sample_files() -> list[tuple[str, str, str, Path]]:
    """(family, lang, split, path) for every file the 8 family/language pairs read."""
    out = []
    for family in FAMILIES.values():
        for lang, config in LANGUAGES.items():
            for split in family.splits:
                out.append((family.name, lang, split, SAMPLE_DATA_DIR / family.dataset_id / config / f"{split}.jsonl"))
    return out


def choice_texts(family: str, row: dict) -> list[str]:
    return row["mc1_targets"]["choices"] if family == "nortruthfulqa_mc" else row["choices"]["text"]


def gold_index(family: str, row: dict) -> int:
    if family == "nortruthfulqa_mc":
        return row["mc1_targets"]["labels"].index(1)
    return row["choices"]["label"].index(row["answer"])


def words(text: str) -> list[str]:
    return re.findall(r"[a-zæøåéèüäö0-9]+", text.lower())


@pytest.fixture(scope="module")
def task_manager():
    import lm_eval.models  # noqa: F401  (keeps the built-in models registered)
    from lm_eval.tasks import TaskManager

    return TaskManager()


@pytest.fixture(scope="module")
def all_tasks(task_manager):
    return build_task_dict(task_names(), SAMPLE_DATA_DIR, task_manager=task_manager)["tasks"]


# ---------------------------------------------------------------- the sample files


def test_sample_layout_is_exactly_the_files_the_tasks_read():
    expected = {path for *_, path in sample_files()}
    shipped = set(SAMPLE_DATA_DIR.rglob("*.jsonl"))
    assert shipped == expected
    assert (SAMPLE_DATA_DIR / "README.md").is_file()


@pytest.mark.parametrize(("family", "lang", "split", "path"), sample_files(), ids=lambda v: str(v).split("/")[-1])
def test_sample_rows_have_the_real_schema(family, lang, split, path):
    rows = read_jsonl(path)
    scored = split == FAMILIES[family].scored_split
    assert len(rows) >= (5 if scored else 3)
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    for row in rows:
        assert tuple(row) == SCHEMAS[family]
        assert isinstance(row["curated"], bool)
        if family == "nortruthfulqa_mc":
            assert isinstance(row["id"], int) and not isinstance(row["id"], bool)
            targets = row["mc1_targets"]
            assert tuple(targets) == ("choices", "labels")
            assert 2 <= len(targets["choices"]) <= 12
            assert targets["labels"] == [1] + [0] * (len(targets["choices"]) - 1)
        else:
            assert isinstance(row["id"], str)
            choices = row["choices"]
            assert tuple(choices) == ("label", "text")
            num = len(choices["text"])
            # CommonsenseQA prompts index choices 0..4 and OpenBookQA 0..3: the counts are fixed.
            assert num == {"norcommonsenseqa": 5, "noropenbookqa": 4}.get(family, num)
            assert 2 <= num <= 5
            assert choices["label"] == list("ABCDE")[:num]
            assert row["answer"] in choices["label"]
        if family == "noropenbookqa":
            assert row["fact"].strip()  # process_docs drops rows with an empty fact
        texts = [row.get("question") or row["question_stem"], *choice_texts(family, row)]
        assert all(isinstance(t, str) and t.strip() for t in texts)
        assert len(set(choice_texts(family, row))) == len(choice_texts(family, row))
        foreign = NYNORSK_ONLY if lang == "nob" else BOKMAL_ONLY
        found = foreign.intersection(w for t in texts + [row.get("fact", "")] for w in words(t))
        assert not found, f"{path.name} {row['id']}: {sorted(found)} belongs to the other written standard"


# ---------------------------------------------------------------- task names and overrides


def test_task_names():
    names = task_names()
    assert len(names) == 40 == len(set(names))
    assert names[0] == "norcommonsenseqa_nob_p0" and "nrk_quiz_qa_nno_p4" in names
    assert task_names(["nortruthfulqa_mc"], ["nno"], [1, 3]) == ["nortruthfulqa_mc_nno_p1", "nortruthfulqa_mc_nno_p3"]
    ref = parse_task_name("nortruthfulqa_mc_nob_p2")
    assert (ref.family.name, ref.lang, ref.config, ref.prompt) == ("nortruthfulqa_mc", "nob", "nb", 2)
    for bad in ("nrk_quiz_qa_nob_p5", "nrk_quiz_qa_dan_p0", "arc_easy", "nrk_quiz_qa_nob"):
        with pytest.raises(UserError, match="not a NorEval"):
            parse_task_name(bad)
    with pytest.raises(UserError, match="family 'norquad'"):
        task_names(["norquad"])


def test_local_task_config_points_every_split_at_local_files():
    cfg = local_task_config("noropenbookqa_nno_p3", SAMPLE_DATA_DIR)
    base = SAMPLE_DATA_DIR / "ltg" / "noropenbookqa" / "nn"
    assert cfg == {
        "task": "noropenbookqa_nno_p3",
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(base / "test.jsonl"), "train": str(base / "train.jsonl")}},
    }
    assert local_task_config("norcommonsenseqa_nob_p0", SAMPLE_DATA_DIR)["dataset_kwargs"]["data_files"].keys() == {
        "train"
    }


def test_missing_split_file_names_the_file(tmp_path, task_manager):
    shutil.copytree(SAMPLE_DATA_DIR, tmp_path, dirs_exist_ok=True)
    missing = tmp_path / "ltg" / "noropenbookqa" / "nb" / "train.jsonl"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))) as info:
        local_task_config("noropenbookqa_nob_p0", tmp_path)
    assert isinstance(info.value, NorEvalDataMissing) and isinstance(info.value, UserError)
    assert "train split" in str(info.value)
    with pytest.raises(NorEvalDataMissing, match="train split"):
        build_task_dict(["nrk_quiz_qa_nob_p0", "noropenbookqa_nob_p1"], tmp_path, task_manager=task_manager)


# ---------------------------------------------------------------- building through lm-eval


def test_all_forty_tasks_build_from_local_files(all_tasks):
    assert list(all_tasks) == task_names()
    for name, task in all_tasks.items():
        ref = parse_task_name(name)
        family = ref.family.name
        rows = read_jsonl(SAMPLE_DATA_DIR / ref.family.dataset_id / ref.config / f"{ref.family.scored_split}.jsonl")
        docs = task.eval_docs
        assert len(docs) == len(rows), name  # nothing dropped by process_docs
        assert task.config.dataset_path == "json"
        assert task.config.metric_list and {m["metric"] for m in task.config.metric_list} == set(ref.family.metrics)
        assert task.get_config("num_fewshot") == 0
        for doc, row in zip(docs, rows, strict=True):
            assert doc["id"] == row["id"]
            choices = task.doc_to_choice(doc)
            assert len(choices) == len(choice_texts(family, row)), name
            assert task.doc_to_target(doc) == gold_index(family, row), name
            assert isinstance(task.doc_to_text(doc), str) and task.doc_to_text(doc).strip()


def test_fewshot_openbookqa_uses_the_train_split(task_manager):
    tasks = build_task_dict(["noropenbookqa_nob_p3"], SAMPLE_DATA_DIR, num_fewshot=2, task_manager=task_manager)[
        "tasks"
    ]
    task = tasks["noropenbookqa_nob_p3"]
    assert task.get_config("num_fewshot") == 2
    doc = task.eval_docs[0]
    context = task.fewshot_context(doc, num_fewshot=2)
    train_stems = [r["question_stem"] for r in read_jsonl(SAMPLE_DATA_DIR / "ltg/noropenbookqa/nb/train.jsonl")]
    test_stems = [r["question_stem"] for r in read_jsonl(SAMPLE_DATA_DIR / "ltg/noropenbookqa/nb/test.jsonl")]
    assert sum(stem in context for stem in train_stems) == 2
    assert sum(stem in context for stem in test_stems) == 1
    assert context.endswith(task.doc_to_text(doc))


def test_fewshot_is_refused_where_noreval_fixes_zero_shot(task_manager, caplog):
    names = ["nrk_quiz_qa_nno_p0", "nortruthfulqa_mc_nob_p1", "norcommonsenseqa_nno_p0"]
    with caplog.at_level("WARNING", logger="fjordtune.eval.noreval"):
        tasks = build_task_dict(names, SAMPLE_DATA_DIR, num_fewshot=2, task_manager=task_manager)["tasks"]
    assert tasks["nrk_quiz_qa_nno_p0"].get_config("num_fewshot") == 0
    assert tasks["nortruthfulqa_mc_nob_p1"].get_config("num_fewshot") == 0
    assert tasks["norcommonsenseqa_nno_p0"].get_config("num_fewshot") == 2
    # one line lists the tasks kept at 0-shot; CSQA's shots leave the scored question out (no warning)
    kept = [r.getMessage() for r in caplog.records if "0-shot kept" in r.getMessage()]
    assert len(kept) == 1 and kept[0].endswith("nrk_quiz_qa_nno_p0, nortruthfulqa_mc_nob_p1"), caplog.text
    assert "may include the question" not in caplog.text


def test_chance_level_matches_an_independent_count(all_tasks):
    rows = read_jsonl(SAMPLE_DATA_DIR / "ltg/nortruthfulqa_mc/nn/validation.jsonl")
    expected = sum(1 / len(r["mc1_targets"]["choices"]) for r in rows) / len(rows)
    assert chance_level(all_tasks["nortruthfulqa_mc_nno_p2"]) == pytest.approx(expected)
    assert chance_level(all_tasks["nortruthfulqa_mc_nno_p2"], limit=2) == pytest.approx(
        (1 / len(rows[0]["mc1_targets"]["choices"]) + 1 / len(rows[1]["mc1_targets"]["choices"])) / 2
    )
    assert chance_level(all_tasks["norcommonsenseqa_nob_p4"]) == pytest.approx(0.2)


def test_evaluate_accepts_the_task_dict(task_manager):
    """lm-eval's own `evaluate` scores the local tasks; an LM that prefers long answers gets a predictable acc."""
    from lm_eval.api.model import LM
    from lm_eval.evaluator import evaluate

    class PrefersLongAnswers(LM):
        def loglikelihood(self, requests, disable_tqdm=False):
            return [(float(len(req.args[1])), False) for req in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    names = ["norcommonsenseqa_nob_p0", "nortruthfulqa_mc_nob_p1"]
    task_dict = build_task_dict(names, SAMPLE_DATA_DIR, task_manager=task_manager)
    out = evaluate(lm=PrefersLongAnswers(), task_dict=task_dict, bootstrap_iters=0, log_samples=False)
    for name in names:
        ref = parse_task_name(name)
        rows = read_jsonl(SAMPLE_DATA_DIR / ref.family.dataset_id / ref.config / f"{ref.family.scored_split}.jsonl")
        picks = [
            max(range(len(c)), key=lambda i, c=c: len(c[i])) for c in (choice_texts(ref.family.name, r) for r in rows)
        ]
        expected = sum(p == gold_index(ref.family.name, r) for p, r in zip(picks, rows, strict=True)) / len(rows)
        assert 0 < expected < 1
        assert out["results"][name]["acc,none"] == pytest.approx(expected), name


# ---------------------------------------------------------------- the demo tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def test_tokenizer_files_are_small_and_special_tokens_set(tokenizer):
    assert sum(p.stat().st_size for p in TOKENIZER_DIR.iterdir()) < 150_000
    assert 1500 <= len(tokenizer) <= 2100
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<unk>",
        "<s>",
        "</s>",
        "<pad>",
    )
    assert tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]"]) == list(range(6))
    assert tokenizer.encode("[INST] hei [/INST]", add_special_tokens=False)[0] == 4


@pytest.mark.parametrize(
    "text",
    [
        "Blåbærsyltetøy på skiva! Kva gjer du i dag? Æ Ø Å",
        "Korleis går det med deg i vêret? «Sitat» – og tankestrek.\n\tNy linje  med to mellomrom.",
        "Emoji 🎉🇳🇴 og naïve café, 東京, ½ + ¾",
    ],
)
def test_tokenizer_round_trips_norwegian_text(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_chat_template_is_mistral_style(tokenizer):
    messages = [
        {"role": "system", "content": "Svar kort."},
        {"role": "user", "content": "Hei!"},
        {"role": "assistant", "content": "Hallo."},
        {"role": "user", "content": "Kva heiter du?"},
    ]
    expected = "<s>[INST] Svar kort.\n\nHei! [/INST] Hallo.</s><s>[INST] Kva heiter du? [/INST]"
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    pair = [{"role": "user", "content": "Hei"}, {"role": "assistant", "content": "Hallo"}]
    assert tokenizer.apply_chat_template(pair, tokenize=False) == "<s>[INST] Hei [/INST] Hallo</s>"
    # Rendering a prefix with a generation prompt gives a token prefix of the whole (loss masking relies on it).
    prefix = tokenizer.apply_chat_template(pair[:1], tokenize=True, add_generation_prompt=True, return_dict=False)
    whole = tokenizer.apply_chat_template(pair, tokenize=True, return_dict=False)
    assert whole[: len(prefix)] == prefix and whole.count(tokenizer.bos_token_id) == 1
    assert whole[-1] == tokenizer.eos_token_id
    with pytest.raises(Exception, match="roles must be"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)
    with pytest.raises(Exception, match="add_generation_prompt"):
        tokenizer.apply_chat_template(pair, tokenize=False, add_generation_prompt=True)


def test_tokenizer_build_is_reproducible():
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_tokenizer.py"), "--check"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- the instruction-tuning sample


def test_sft_sample_shape_and_languages():
    rows = read_jsonl(SFT_SAMPLE)
    counts = {lang: sum(r["lang"] == lang for r in rows) for lang in ("nob", "nno", "eng")}
    assert sum(counts.values()) == len(rows) >= 55
    assert counts["nob"] >= 20 and counts["nno"] >= 15 and counts["eng"] >= 10
    for row in rows:
        assert set(row) == {"messages", "lang"}
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in row["messages"])
        foreign = {"nob": NYNORSK_ONLY, "nno": BOKMAL_ONLY}.get(row["lang"], set())
        assert not foreign.intersection(words(row["messages"][0]["content"])), row["messages"][0]["content"]
    assert len({r["messages"][0]["content"] for r in rows}) == len(rows)


def test_sft_sample_does_not_overlap_the_noreval_samples():
    """No 5-word run of a NorEval sample question or fact appears in the SFT rows, and no SFT prompt
    shares most of its words with a NorEval question."""

    def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
        w = words(text)
        return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}

    questions = []
    for family, _, _, path in sample_files():
        for row in read_jsonl(path):
            questions.append(row.get("question") or row["question_stem"])
            if family == "noropenbookqa":
                questions.append(row["fact"])
    sft_texts = [m["content"] for r in read_jsonl(SFT_SAMPLE) for m in r["messages"]]
    eval_shingles = set().union(*(shingles(q) for q in questions))
    for text in sft_texts:
        assert not shingles(text) & eval_shingles, text
        a = set(words(text))
        for q in questions:
            b = set(words(q))
            assert len(a & b) / len(a | b) < 0.5, (text, q)


def test_a_pattern_expands_to_tasks_not_to_the_tags_that_group_them():
    from fjordtune.eval.run import expand_tasks, task_manager

    tm = task_manager()
    got = expand_tasks(["nrk_quiz_qa_*"], known=list(tm.all_tasks), leaves=list(tm.all_subtasks))
    assert got == [f"nrk_quiz_qa_{lang}_p{k}" for lang in ("nno", "nob") for k in range(5)]
    # without the leaf list the tags come along (what used to break the NorEval builder)
    assert "nrk_quiz_qa_nob" in expand_tasks(["nrk_quiz_qa_*"], known=list(tm.all_tasks))
    # a tag named in full is still accepted
    assert expand_tasks(["nrk_quiz_qa_nob"], known=list(tm.all_tasks), leaves=list(tm.all_subtasks)) == \
        ["nrk_quiz_qa_nob"]
