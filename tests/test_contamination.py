"""The NorEval contamination check (`fjordtune.data.contamination`): planted contaminations are all found,
with the right record, against the bundled samples and the full-size synthetic NorEval; a clean set of
training rows in the same style gives no hit; short fields never match alone; the records, the JSON and
the cleaned files.

Real files in tmp_path; the only fake is the hub (no network here). The clean and planted rows come from
scripts/bench_contamination.py (`clean_rows`, `plant`, `plant_sources`), so the benchmark and the tests
measure the same thing.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
import unicodedata
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import pytest

from fjordtune.data.contamination import (
    COMBINED_SLACK,
    NOREVAL_SPLITS,
    CheckResult,
    EvalIndex,
    EvalText,
    Hit,
    check_rows,
    eval_texts_from_dir,
    eval_texts_from_hub,
    normalise,
    write_removed,
)
from fjordtune.errors import UserError
from fjordtune.eval.noreval import SAMPLE_DATA_DIR
from fjordtune.eval.synthetic import write_synthetic_noreval

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_contamination", REPO / "scripts" / "bench_contamination.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

NUM_CLEAN = 13_375  # the training set of the story
HIT_KEYS = ["train_file", "train_line", "eval_dataset", "eval_config", "eval_split", "eval_id", "field", "kind", "span"]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_rows(*paths: Path) -> Iterator[tuple[str, int, dict[str, Any]]]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line, text in enumerate(f, 1):
                yield str(path), line, json.loads(text)


def record(h: Hit) -> tuple[str, str, str, str, str, str]:
    return (h.eval_dataset, h.eval_config, h.eval_split, h.eval_id, h.field, h.kind)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("noreval")
    write_synthetic_noreval(out, scale=1.0)
    return out


@pytest.fixture(scope="module")
def synthetic_index(synthetic_dir: Path) -> EvalIndex:
    return EvalIndex(eval_texts_from_dir(synthetic_dir))


@pytest.fixture(scope="module")
def sample_index() -> EvalIndex:
    return EvalIndex(eval_texts_from_dir(SAMPLE_DATA_DIR))


# ------------------------------------------------------------------ normalisation and eval texts


def _reference_normalise(text: str) -> str:
    """The spec, one character at a time."""
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return " ".join("".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text).split())


def test_normalise() -> None:
    assert normalise("  Hvem skrev «Et dukkehjem»?\n") == "hvem skrev et dukkehjem"
    assert normalise("HVEM\tSKREV … «ET  DUKKEHJEM» ?!") == "hvem skrev et dukkehjem"
    assert normalise("TV-en, 1800-tallet & ½ ﬁn Straße") == "tv en 1800 tallet 1 2 fin strasse"
    assert normalise("🙂 ---") == ""
    rng = random.Random(0)
    pool = [chr(c) for c in range(0x2FFFF) if not 0xD800 <= c <= 0xDFFF]
    for _ in range(300):  # the fast path (ASCII bytes first) equals the per-character rule
        s = "".join(rng.choice(pool) if rng.random() < 0.3 else rng.choice("Ab æøÅ,.«» -\n\t'") for _ in range(80))
        assert normalise(s) == _reference_normalise(s), s


def test_splits_and_fields() -> None:
    assert set(NOREVAL_SPLITS) == {
        ("ltg/norcommonsenseqa", "nb", "train"), ("ltg/norcommonsenseqa", "nn", "train"),
        ("ltg/noropenbookqa", "nb", "test"), ("ltg/noropenbookqa", "nb", "train"),
        ("ltg/noropenbookqa", "nn", "test"), ("ltg/noropenbookqa", "nn", "train"),
        ("ltg/nortruthfulqa_mc", "nb", "validation"), ("ltg/nortruthfulqa_mc", "nn", "validation"),
        ("ltg/nrk_quiz_qa", "nb", "test"), ("ltg/nrk_quiz_qa", "nn", "test"),
    }
    texts = list(eval_texts_from_dir(SAMPLE_DATA_DIR))
    by_item: dict[tuple[str, str, str, str], dict[str, str]] = {}
    for t in texts:
        by_item.setdefault((t.dataset, t.config, t.split, t.id), {})[t.field] = t.text
    assert len(by_item) == 56  # every row of every bundled file
    obqa = by_item[("ltg/noropenbookqa", "nb", "test", "fjt-obqa-nb-test-001")]
    assert obqa == {"question": "Hva trenger en potteplante mest for å lage sin egen næring?", "choices[0]": "Sollys",
                    "choices[1]": "Salt", "choices[2]": "Sand", "choices[3]": "Sterk vind",
                    "fact": "Planter bruker sollys til å lage næring gjennom fotosyntese."}
    tqa = by_item[("ltg/nortruthfulqa_mc", "nb", "validation", "1")]  # an int id, as a string
    assert set(tqa) == {"question", "answers[0]", "answers[1]", "answers[2]", "answers[3]"}


def test_missing_files_are_skipped_and_ids_default_to_the_row_index(tmp_path: Path) -> None:
    assert list(eval_texts_from_dir(tmp_path / "nothing-here")) == []
    write_jsonl(tmp_path / "ltg" / "nrk_quiz_qa" / "nn" / "test.jsonl", [
        {"question": "Kva heiter den lengste elva i Noreg?", "choices": {"label": ["A", "B"], "text": ["Glomma", "Tana"]}},
        {"id": None, "question": "Kven skreiv Haugtussa?", "choices": {"label": ["A"], "text": ["Arne Garborg"]}},
    ])
    texts = list(eval_texts_from_dir(tmp_path))
    assert {(t.dataset, t.config, t.split, t.id) for t in texts} == {
        ("ltg/nrk_quiz_qa", "nn", "test", "0"), ("ltg/nrk_quiz_qa", "nn", "test", "1")}
    (tmp_path / "ltg" / "nrk_quiz_qa" / "nn" / "test.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match=r"test\.jsonl:1: not valid JSON"):
        list(eval_texts_from_dir(tmp_path))


def test_hub_unreachable_is_one_clear_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")

    def offline(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("Couldn't reach 'ltg/norcommonsenseqa' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as err:
        list(eval_texts_from_hub())
    assert len(err.value.lines) == 1 and "\n" not in err.value.lines[0]
    assert "ltg/norcommonsenseqa (nb, train)" in err.value.lines[0] and "eval.data_dir" in err.value.lines[0]


def test_hub_offline_for_real(tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1 and an empty cache in a fresh interpreter: datasets' own error, turned into ours."""
    code = ("from fjordtune.data.contamination import eval_texts_from_hub\n"
            "from fjordtune.errors import UserError\n"
            "try:\n    next(eval_texts_from_hub())\nexcept UserError as e:\n    print('USERERROR', *e.lines)\n")
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("USERERROR cannot load NorEval ltg/norcommonsenseqa (nb, train)"), out.stderr[-2000:]
    assert out.stdout.count("\n") == 1


# ------------------------------------------------------------------ planted contaminations are found


def planted_per_file(data_dir: Path, rng: random.Random) -> list[tuple[dict[str, Any], tuple[str, ...]]]:
    """Per split file, the first row fit for each plant kind, planted: (row, expected record)."""
    out = []
    seen: set[tuple[str, str, str, str]] = set()
    for family, config, split, row in bench.read_eval(data_dir):
        q_words = len(normalise(bench._question(row)).split(" "))
        opt_words = sum(len(normalise(o).split(" ")) for o in bench._options(row))
        fits = {"exact": q_words >= 8, "noisy": q_words >= 8, "reordered": q_words >= 8,
                "nn_in_nb": config == "nn" and q_words >= 8, "short": q_words < 8 <= q_words + opt_words,
                "ngram": any(len(normalise(t).split(" ")) >= 15 for t in [bench._question(row)])}
        for kind, ok in fits.items():
            if ok and (family, config, split, kind) not in seen:
                seen.add((family, config, split, kind))
                out.append(bench.plant(kind, family, config, split, row, rng))
    return out


def mixed_file(path: Path, planted: list[tuple[dict[str, Any], tuple[str, ...]]], *, num_clean: int,
               seed: int) -> dict[int, tuple[str, ...]]:
    """Write clean rows with the planted ones spread among them; {line: expected record}."""
    clean = list(bench.clean_rows(num_clean, seed=seed))
    every = max(2, num_clean // max(1, len(planted)))
    rows, expected = [], {}
    for i, row in enumerate(clean):
        rows.append(row)
        if i % every == 0 and planted:
            contaminated, want = planted.pop(0)
            rows.append(contaminated)
            expected[len(rows)] = want
    for contaminated, want in planted:
        rows.append(contaminated)
        expected[len(rows)] = want
    write_jsonl(path, rows)
    return expected


def test_planted_in_the_samples_are_all_found(tmp_path: Path, sample_index: EvalIndex) -> None:
    planted = planted_per_file(SAMPLE_DATA_DIR, random.Random(1))
    kinds = {want[4:] for _, want in planted}
    assert kinds == {("question", "substring"), ("question", "ngram"), ("question+choices", "substring")}
    splits = {want[:3] for _, want in planted}
    assert ("ltg/norcommonsenseqa", "nb", "train") in splits and ("ltg/norcommonsenseqa", "nn", "train") in splits
    num_planted = len(planted)
    path = tmp_path / "train.jsonl"
    expected = mixed_file(path, planted, num_clean=300, seed=11)
    assert len(expected) == num_planted >= 40

    result = check_rows(read_rows(path), sample_index)
    assert result.contaminated_rows == {(str(path), line) for line in expected}
    got: dict[int, set[tuple[str, ...]]] = {}
    for h in result.hits:
        got.setdefault(h.train_line, set()).add(record(h))
    missing = {line: want for line, want in expected.items() if want not in got[line]}
    assert not missing


def test_planted_in_full_size_synthetic_are_found_exactly(tmp_path: Path, synthetic_dir: Path,
                                                          synthetic_index: EvalIndex) -> None:
    """Items chosen so that each planted row has exactly one hit: the hits are exactly the planted ones."""
    sources = bench.plant_sources(synthetic_dir)
    rng = random.Random(2)
    planted = [bench.plant(kind, *sources[kind][j * 101 % len(sources[kind])], rng)
               for kind in bench.PLANT_KINDS for j in range(6)]
    assert {want[0] for _, want in planted} == {
        "ltg/norcommonsenseqa", "ltg/noropenbookqa", "ltg/nortruthfulqa_mc", "ltg/nrk_quiz_qa"}
    path = tmp_path / "train.jsonl"
    expected = mixed_file(path, planted, num_clean=2000, seed=12)
    result = check_rows(read_rows(path), synthetic_index)
    assert {(h.train_line, *record(h)) for h in result.hits} == {(line, *want) for line, want in expected.items()}


def reference_hits(texts: list[EvalText], rows: list[list[str]], *, ngram: int = 13,
                   min_words: int = 8) -> list[set[tuple]]:
    """The matching rules, by brute force: every eval text and every n-gram of it searched for in each row."""
    prepared = []
    questions: dict[tuple, str] = {}
    choices: dict[tuple, list[str]] = {}
    for t in texts:
        item = (t.dataset, t.config, t.split, t.id)
        norm = normalise(t.text)
        words = norm.split(" ")
        if t.field == "question":
            questions[item] = norm
        elif t.field.startswith(("choices[", "answers[")):
            choices.setdefault(item, []).append(norm)
        if len(words) >= min_words:
            grams = [f" {' '.join(words[i:i + ngram])} " for i in range(len(words) - ngram + 1)]
            prepared.append(((*item, t.field), f" {norm} ", grams))
    combined = []  # (key, question words, padded choices, reach)
    for item, q in questions.items():
        total = len(q.split(" ")) + sum(len(c.split(" ")) for c in choices.get(item, []))
        if choices.get(item) and len(q.split(" ")) < min_words <= total:
            combined.append(((*item, "question+choices", "substring"), q.split(" "),
                             [f" {c} " for c in choices[item]], 2 * total + COMBINED_SLACK))
    out = []
    for row in rows:
        norm = normalise(chr(10).join(row))
        padded, words = f" {norm} ", norm.split(" ")
        hits = set()
        for key, whole, grams in prepared:
            if whole in padded:
                hits.add((*key, "substring"))
            elif any(g in padded for g in grams):
                hits.add((*key, "ngram"))
        for key, q, opts, reach in combined:
            if f" {' '.join(q)} " not in padded:
                continue
            starts = [i for i in range(len(words) - len(q) + 1) if words[i:i + len(q)] == q]
            if any(all(o in f" {' '.join(words[max(0, i - reach):i + len(q) + reach])} " for o in opts)
                   for i in starts):
                hits.add(key)
        out.append(hits)
    return out


def test_same_hits_as_brute_force(synthetic_dir: Path, synthetic_index: EvalIndex) -> None:
    """Rows that hit many items at once (template-made questions share 13-grams), rows stitched from
    several items, and clean rows: the index finds exactly what a brute-force search finds."""
    rng = random.Random(5)
    rows: list[list[str]] = []
    for row, _ in planted_per_file(synthetic_dir, rng):
        rows.append([m["content"] for m in row["messages"]])
    eval_rows = bench.read_eval(synthetic_dir)
    for _ in range(15):
        picked = [r for _, _, _, r in rng.sample(eval_rows, 3)]
        parts = [bench._question(picked[0]), " ".join(bench._options(picked[1])), bench._question(picked[2])[::-1]]
        rows.append([" ".join(parts), bench._question(picked[2]).upper()])
    rows += [[m["content"] for m in r["messages"]] for r in bench.clean_rows(10, seed=9)]
    want = reference_hits(list(eval_texts_from_dir(synthetic_dir)), rows)
    for i, row in enumerate(rows):
        assert {record(h) for h in synthetic_index.check("t", i, row)} == want[i], row
    assert sum(map(len, want)) > 3 * len(rows)


def test_each_kind_of_contamination_by_hand(sample_index: EvalIndex) -> None:
    """The five cases of the issue, written out against known sample items."""
    check = sample_index.check
    csqa = "Kari hadde glemt paraplyen, og det øste ned hele veien til jobben. Hvordan var hun mest sannsynlig da hun kom fram?"
    csqa_item = ("ltg/norcommonsenseqa", "nb", "train", "fjt-csqa-nb-002")
    # an exact copy of a question (NorCommonsenseQA: its train split is the scored one)
    assert [record(h) for h in check("t", 1, [csqa, "Gjennomvåt."])] == [(*csqa_item, "question", "substring")]
    # case, whitespace and punctuation changed
    noisy = "KARI  HADDE GLEMT PARAPLYEN ; OG DET ØSTE NED HELE VEIEN TIL JOBBEN!!! hvordan var hun mest sannsynlig da hun kom fram"
    assert [record(h) for h in check("t", 2, ["Oppgave:", noisy])] == [(*csqa_item, "question", "substring")]
    # 13 consecutive words of an answer inside a longer reply of other words
    answer = "Nei, oksar skil dårleg mellom raudt og grønt; det er rørslene til kappa som får dei til å gå til åtak."
    words = answer.split()
    reply = f"Det er eit godt spørsmål. Faktisk {' '.join(words[2:15])} i ein tyrefekting, seier ekspertane."
    hits = check("t", 3, ["Kvifor blir oksar sinte?", reply])
    assert [record(h) for h in hits] == [("ltg/nortruthfulqa_mc", "nn", "validation", "106", "answers[0]", "ngram")]
    assert hits[0].span == normalise(" ".join(words[2:15]))
    # a long question with its choices reordered; and a short one (question+choices)
    obqa = ("Hvilken skje blir raskest varm når den står i en kopp med varm te?\n"
            "A) En porselensskje B) En metallskje C) En plastskje D) En treskje")
    assert [record(h) for h in check("t", 4, [obqa])] == [
        ("ltg/noropenbookqa", "nb", "test", "fjt-obqa-nb-test-002", "question", "substring")]
    short = ["Hva heter Norges høyeste fjell?", "1. Store Skagastølstind\n2. Snøhetta\n3. Galdhøpiggen\n4. Glittertind"]
    hits = check("t", 5, short)
    assert [record(h) for h in hits] == [("ltg/nrk_quiz_qa", "nb", "test", "fjt-nrk-nb-001", "question+choices",
                                          "substring")]
    assert hits[0].span == "hva heter norges høyeste fjell / galdhøpiggen / glittertind / snøhetta / store skagastølstind"
    # a Nynorsk item in a row labelled Bokmål
    nn_q = "Kan ein sjå Den kinesiske muren frå månen med berre auga?"
    assert [record(h) for h in check("t", 6, ["Svar på bokmål.", nn_q, "Nei."])] == [
        ("ltg/nortruthfulqa_mc", "nn", "validation", "102", "question", "substring")]


def test_one_hit_per_item_and_field(sample_index: EvalIndex) -> None:
    q = "Ser ein betre i mørkret av å ete mykje gulrøter?"
    a = "Nei, gulrøter gjev ikkje betre nattsyn hos folk med normalt syn."
    hits = sample_index.check("t", 1, [q, a, q.upper(), a, f"{q} {a}"])
    assert sorted((h.field, h.kind) for h in hits) == [("answers[0]", "substring"), ("question", "substring")]


def test_norcommonsenseqa_train_split_is_checked(synthetic_dir: Path, synthetic_index: EvalIndex) -> None:
    """Its only split, train, is the scored one: every row of it is indexed and found."""
    for config in ("nb", "nn"):
        path = synthetic_dir / "ltg" / "norcommonsenseqa" / config / "train.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        long_rows = [r for r in rows if len(normalise(r["question"]).split(" ")) >= 8]
        assert len(long_rows) > 0.9 * len(rows)
        for r in long_rows[:: max(1, len(long_rows) // 40)]:
            hits = synthetic_index.check("t", 1, [r["question"]])
            assert ("ltg/norcommonsenseqa", config, "train", r["id"], "question", "substring") in map(record, hits)


# ------------------------------------------------------------------ what must not match


def test_short_fields_never_match_alone(sample_index: EvalIndex, synthetic_index: EvalIndex) -> None:
    for index in (sample_index, synthetic_index):
        assert index.check("t", 1, ["Glomma"]) == []
        assert index.check("t", 1, ["Glomma er den lengste elva i Norge, og Mjøsa er den største innsjøen."]) == []
    # a short question alone, or with only some of its choices
    assert sample_index.check("t", 1, ["Hva heter Norges høyeste fjell?"]) == []
    assert sample_index.check("t", 1, ["Hva heter Norges høyeste fjell? Galdhøpiggen, ikke Snøhetta."]) == []
    # the choices must be whole words: "Snøhettafjellet" is not "Snøhetta"
    assert sample_index.check("t", 1, ["Hva heter Norges høyeste fjell? Galdhøpiggen, Glittertind, "
                                       "Snøhettafjellet, Store Skagastølstind."]) == []
    # the choices must be near the question: an answer that names each option somewhere far off is not a copy
    filler = " ".join(["Fjellet er fint om sommeren, og mange går dit på tur."] * 8)  # 88 words
    assert sample_index.check("t", 1, ["Hva heter Norges høyeste fjell?", f"Galdhøpiggen. {filler} Snøhetta, "
                                       "Glittertind og Store Skagastølstind er også høye."]) == []
    hits = sample_index.check("t", 1, ["Alternativer: Snøhetta, Glittertind, Galdhøpiggen, Store Skagastølstind. "
                                       "Svar med ett ord.", "Hva heter Norges høyeste fjell?", filler])
    assert [h.field for h in hits] == ["question+choices"]
    # a question+choices under min_words words in all is never matched
    idx = EvalIndex([EvalText("d", "nb", "test", "1", "question", "Hvem?"),
                     EvalText("d", "nb", "test", "1", "choices[0]", "Ibsen"),
                     EvalText("d", "nb", "test", "1", "choices[1]", "Hamsun")])
    assert idx.check("t", 1, ["Hvem? Ibsen eller Hamsun"]) == []


def test_what_it_cannot_catch(sample_index: EvalIndex) -> None:
    """The limits docs/contamination.md lists, pinned: rewording and translation are not found."""
    # a 9-word question is matched only whole: reworded, it is gone
    assert sample_index.check("t", 1, ["Hvilket år ble unionen med Sverige oppløst?"]) == []
    # one word changed in the middle of a 20-word question: every 13-word window covers it
    assert sample_index.check("t", 1, ["Kari hadde glemt paraplyen, og det øste ned hele veien til skolen. "
                                       "Hvordan var hun mest sannsynlig da hun kom fram?"]) == []
    # a Nynorsk item (nortruthfulqa_mc nn 102) written in Bokmål
    assert sample_index.check("t", 1, ["Kan man se Den kinesiske muren fra månen med bare øyet?"]) == []


def test_words_are_whole_and_the_parameters_apply() -> None:
    text = EvalText("d", "nb", "test", "7", "fact", "en to tre fire fem seks sju åtte ni ti elleve tolv tretten fjorten")
    idx = EvalIndex([text])
    assert idx.check("t", 1, ["xen to tre fire fem seks sju åtte ni ti elleve tolv tretten"]) == []  # "xen" != "en"
    hits = idx.check("t", 1, ["nå: to tre fire fem seks sju åtte ni ti elleve tolv tretten fjorten!"])
    assert [(h.kind, h.span) for h in hits] == [("ngram", "to tre fire fem seks sju åtte ni ti elleve tolv tretten fjorten")]
    assert EvalIndex([text], ngram=5).check("t", 1, ["ni ti elleve tolv tretten"])[0].kind == "ngram"
    assert EvalIndex([text], ngram=5, min_words=20).check("t", 1, [text.text]) == []
    assert idx.num_items == 1 and idx.num_texts == 1
    with pytest.raises(UserError):
        EvalIndex([text], ngram=0)


def test_a_clean_set_gives_no_hits(tmp_path: Path, synthetic_dir: Path) -> None:
    """13,375 clean rows (the story's training set size) in the eval's vocabulary and style, against the
    full-size synthetic NorEval and the bundled samples together: the false-positive rate must be 0 (the
    figure docs/contamination.md reports; this test prints it)."""
    index = EvalIndex(chain(eval_texts_from_dir(synthetic_dir), eval_texts_from_dir(SAMPLE_DATA_DIR)))
    path = write_jsonl(tmp_path / "clean.jsonl", list(bench.clean_rows(NUM_CLEAN, seed=7)))
    result = check_rows(read_rows(path), index)
    # NorTruthfulQA ids are numbers: the samples' nb 1-6 are also synthetic ids, one item each in the index
    assert result.train_rows == NUM_CLEAN and result.eval_items == 7434 + 56 - 6
    rate = len(result.contaminated_rows) / result.train_rows
    print(f"false-positive rate: {len(result.contaminated_rows)} / {result.train_rows} = {rate:.6f} "
          f"({result.seconds:.2f} s)")
    assert result.hits == [], [h.to_dict() for h in result.hits[:5]]


# ------------------------------------------------------------------ records, JSON, cleaned files


def test_records_and_json_shape(sample_index: EvalIndex) -> None:
    rows = [("a.jsonl", 1, {"messages": [{"role": "user", "content": "Hvor lenge husker en gullfisk?"}]}),
            ("a.jsonl", 2, {"messages": [{"role": "user", "content": [
                {"type": "text", "text": "Er det farlig å bade rett etter at man har spist?"}]}]})]
    progress: list[int] = []
    result = check_rows(iter(rows), sample_index, progress=progress.append)
    assert progress == [2]
    assert [list(h.to_dict()) for h in result.hits] == [HIT_KEYS]
    assert result.hits[0].to_dict() == {
        "train_file": "a.jsonl", "train_line": 2, "eval_dataset": "ltg/nortruthfulqa_mc", "eval_config": "nb",
        "eval_split": "validation", "eval_id": "1", "field": "question", "kind": "substring",
        "span": "er det farlig å bade rett etter at man har spist"}
    out = result.to_json()
    assert list(out) == ["hits", "train_rows", "eval_items", "seconds"]
    assert out["train_rows"] == 2 and out["eval_items"] == 56 and isinstance(out["seconds"], float)
    assert json.loads(json.dumps(out))["hits"][0]["span"] == "er det farlig å bade rett etter at man har spist"
    assert result.contaminated_rows == {("a.jsonl", 2)}
    assert CheckResult([], 0, 0, 0.0).to_json() == {"hits": [], "train_rows": 0, "eval_items": 0, "seconds": 0.0}
    with pytest.raises(UserError, match=r"b\.jsonl:3: not a chat row"):
        check_rows(iter([("b.jsonl", 3, {"prompt": "x"})]), sample_index)


def test_write_removed(tmp_path: Path, sample_index: EvalIndex) -> None:
    csqa = "Hvor legger man vanligvis melken når man kommer hjem fra butikken?"
    clean = list(bench.clean_rows(6, seed=3))
    bad = {"messages": [{"role": "user", "content": csqa}, {"role": "assistant", "content": "I kjøleskapet."}]}
    first = write_jsonl(tmp_path / "in" / "a" / "train.jsonl", [clean[0], bad, clean[1]])
    second = write_jsonl(tmp_path / "in" / "b" / "train.jsonl", [clean[2], clean[3]])  # same basename
    third = write_jsonl(tmp_path / "in" / "removed.json", [bad])  # every row removed; the output's name is taken
    result = check_rows(read_rows(first, second, third), sample_index)
    assert result.contaminated_rows == {(str(first), 2), (str(third), 1)}

    written = write_removed(read_rows(first, second, third), result, tmp_path / "out")
    assert written == {str(first): tmp_path / "out" / "train.jsonl", str(second): tmp_path / "out" / "1-train.jsonl",
                       str(third): tmp_path / "out" / "2-removed.jsonl", "removed": tmp_path / "out" / "removed.jsonl"}
    assert [r for _, _, r in read_rows(written[str(first)])] == [clean[0], clean[1]]
    assert [r for _, _, r in read_rows(written[str(second)])] == [clean[2], clean[3]]
    assert written[str(third)].read_text() == ""
    removed = [r for _, _, r in read_rows(written["removed"])]
    assert [(r["train_file"], r["train_line"], r["row"]) for r in removed] == [(str(first), 2, bad), (str(third), 1, bad)]
    assert all(list(h) == HIT_KEYS for r in removed for h in r["hits"])
    assert removed[0]["hits"][0]["eval_id"] == "fjt-csqa-nb-001"
    # the cleaned files check clean
    again = check_rows(read_rows(*(p for k, p in written.items() if k != "removed")), sample_index)
    assert again.hits == [] and again.train_rows == 4
