"""Deterministic synthetic NorEval-format data at the size of the real test sets, for benchmarks.

    python -m fjordtune.eval.synthetic OUT [--scale 1.0] [--seed 0]

Writes the layout `fjordtune.eval.noreval` reads (`<out>/ltg/<dataset>/<nb|nn>/<split>.jsonl`) with
the row schema of the bundled samples, sized like the real sets at `scale` 1.0:

| family | scored split (rows nb / nn) | other split |
|---|---|---|
| norcommonsenseqa | train 998 / 95 | - |
| noropenbookqa | test 376 / 90 (2 nb rows with an empty `fact`, which lm-eval drops: 374 scored) | train 300 / 100 |
| nortruthfulqa_mc | validation 488 / 57 | - |
| nrk_quiz_qa | test 3600 / 1330 | - |

7,032 scored documents per prompt, 35,160 task-docs over the 5 prompts. The NorOpenBookQA `train`
split (few-shot examples only) is our choice of size, not the real one. Choices per question: 5
(NorCommonsenseQA) and 4 (NorOpenBookQA), as the prompts require; NRK 3-5 (mostly 4) and
NorTruthfulQA 2-10 (about 5 on average) are our approximations of the real spread.

The text is generated from word lists by a seeded RNG: Norwegian quiz-like questions of realistic
length, every question text unique within a file (so that no two documents share a prompt by
accident), gold answers at random positions. Same seed and scale: byte-identical files; each file
at a smaller scale is a prefix of the same file at a larger one. Scores on it mean nothing about a
model: it exists to measure the speed of scoring and to compare two scorers on the same requests.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fjordtune.eval import _synthetic_vocab as V
from fjordtune.eval.noreval import FAMILIES, LANGUAGES

FULL_ROWS: Mapping[tuple[str, str, str], int] = {
    ("norcommonsenseqa", "nb", "train"): 998, ("norcommonsenseqa", "nn", "train"): 95,
    ("noropenbookqa", "nb", "test"): 376, ("noropenbookqa", "nn", "test"): 90,
    ("noropenbookqa", "nb", "train"): 300, ("noropenbookqa", "nn", "train"): 100,
    ("nortruthfulqa_mc", "nb", "validation"): 488, ("nortruthfulqa_mc", "nn", "validation"): 57,
    ("nrk_quiz_qa", "nb", "test"): 3600, ("nrk_quiz_qa", "nn", "test"): 1330,
}
"""Rows per (family, config, split) at scale 1.0."""

EMPTY_FACT_PERIOD, EMPTY_FACT_OFFSET = 188, 2
"""NorOpenBookQA nb test rows i with i % 188 == 2 get an empty `fact` (rows 2 and 190 at full size)."""

_NRK_CHOICES = {3: 30, 4: 60, 5: 10}  # number of choices: weight
_TQA_CHOICES = {2: 6, 3: 14, 4: 20, 5: 18, 6: 14, 7: 10, 8: 8, 9: 5, 10: 5}
_MAX_TRIES = 20_000


def num_rows(family: str, config: str, split: str, *, scale: float = 1.0) -> int:
    """Rows of one file at `scale`: round(full x scale), at least 1 (at least 5 in a few-shot-only split)."""
    _check_scale(scale)
    least = 1 if split == FAMILIES[family].scored_split else 5
    return max(least, round(FULL_ROWS[(family, config, split)] * scale))


def num_scored_docs(*, scale: float = 1.0) -> dict[str, int]:
    """Documents lm-eval scores per prompt, by `<family>_<lang>` (after process_docs drops empty facts)."""
    out = {}
    for family in FAMILIES.values():
        for lang, config in LANGUAGES.items():
            n = num_rows(family.name, config, family.scored_split, scale=scale)
            out[f"{family.name}_{lang}"] = n - sum(_empty_fact(family.name, config, family.scored_split, i)
                                                  for i in range(n))
    return out


def write_synthetic_noreval(out_dir: str | Path, *, scale: float = 1.0, seed: int = 0) -> dict[str, int]:
    """Write every file the 40 NorEval multiple-choice tasks read; return {relative path: rows}."""
    out, written = Path(out_dir), {}
    for (family, config, split) in FULL_ROWS:
        rel = f"{FAMILIES[family].dataset_id}/{config}/{split}.jsonl"
        rows = make_rows(family, config, split, num_rows(family, config, split, scale=scale), seed=seed)
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        written[rel] = len(rows)
    return written


def make_rows(family: str, config: str, split: str, count: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """The first `count` rows of one file: one RNG per file, rows drawn in order, questions kept unique."""
    rng = random.Random(f"fjordtune-synthetic-noreval:{seed}:{family}:{config}:{split}")
    lang = ("nb", "nn").index(config)
    make: Callable[[random.Random, int], dict[str, Any]] = _MAKERS[family]
    seen: set[str] = set()
    rows = []
    for i in range(count):
        for _ in range(_MAX_TRIES):
            row = make(rng, lang)
            key = row.get("question") or row["question_stem"]
            if key not in seen:
                break
        else:
            raise RuntimeError(f"{family}/{config}/{split}: no new question after {_MAX_TRIES} tries at row {i}; "
                               "the word lists are too small for this many rows")
        seen.add(key)
        rows.append(_finish(family, config, split, i, row, rng))
    return rows


def _finish(family: str, config: str, split: str, i: int, row: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Add id and curated, in the column order of the real dataset."""
    short = {"norcommonsenseqa": "csqa", "noropenbookqa": "obqa", "nortruthfulqa_mc": "tqa", "nrk_quiz_qa": "nrk"}
    row_id: int | str = i + 1 if family == "nortruthfulqa_mc" else f"syn-{short[family]}-{config}-{split}-{i + 1:05d}"
    curated = rng.random() < 0.6
    if family == "noropenbookqa" and _empty_fact(family, config, split, i):
        row["fact"] = ""
    order = {
        "norcommonsenseqa": ("question", "choices", "answer"),
        "noropenbookqa": ("question_stem", "choices", "answer", "fact"),
        "nortruthfulqa_mc": ("question", "mc1_targets"),
        "nrk_quiz_qa": ("question", "choices", "answer", "quiz"),
    }[family]
    return {"id": row_id, **{k: row[k] for k in order}, "curated": curated}


def _empty_fact(family: str, config: str, split: str, i: int) -> bool:
    return (family, config, split) == ("noropenbookqa", "nb", "test") and i % EMPTY_FACT_PERIOD == EMPTY_FACT_OFFSET


def _check_scale(scale: float) -> None:
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale!r} (1.0 is the size of the real test sets)")


# ------------------------------------------------------------------ one row per family


def _labelled(rng: random.Random, correct: str, wrong: list[str]) -> tuple[dict[str, list[str]], str]:
    """Choices with the correct one at a random position: ({label, text}, answer label)."""
    texts = list(wrong)
    pos = rng.randrange(len(texts) + 1)
    texts.insert(pos, correct)
    labels = list("ABCDE")[: len(texts)]
    return {"label": labels, "text": texts}, labels[pos]


def _pick(rng: random.Random, pairs: tuple[V.Pair, ...], lang: int) -> str:
    return rng.choice(pairs)[lang]


def _person(rng: random.Random, lang: int) -> tuple[str, str]:
    name, female = rng.choice(V.NAMES)
    return name, (V.SHE if female else V.HE)[lang]


def _csqa(rng: random.Random, lang: int) -> dict[str, Any]:
    name, pron = _person(rng, lang)
    slots = {
        "name": name, "pron": pron, "verb": _pick(rng, V.CSQA_VERBS, lang), "obj": _pick(rng, V.CSQA_OBJECTS_DEF, lang),
        "situation": _pick(rng, V.CSQA_SITUATIONS, lang), "setup": _pick(rng, V.CSQA_SETUPS, lang),
        "task": _pick(rng, V.CSQA_TASKS, lang), "time": _pick(rng, V.TIMES, lang), "risky": _pick(rng, V.CSQA_RISKY, lang),
    }
    templates = (
        (("Hvor {verb} man vanligvis {obj} når man {situation}?", "Kvar {verb} ein vanlegvis {obj} når ein {situation}?"),
         "place"),
        (("{name} {setup}. Hvor er {pron} mest sannsynlig på vei nå?", "{name} {setup}. Kvar er {pron} mest truleg på veg no?"),
         "place"),
        (("{name} {setup}. Hvordan har {pron} det mest sannsynlig?", "{name} {setup}. Korleis har {pron} det mest truleg?"),
         "feeling"),
        (("Hva trenger man først og fremst når man skal {task}?", "Kva treng ein først og fremst når ein skal {task}?"),
         "object"),
        (("Hva gjør folk gjerne {time} når de {situation}?", "Kva gjer folk gjerne {time} når dei {situation}?"), "action"),
        (("Hvis du {situation}, hva er det lurt å gjøre?", "Om du {situation}, kva er lurt å gjere?"), "action"),
        (("Hva kan skje hvis man {risky}?", "Kva kan skje om ein {risky}?"), "outcome"),
        (("{name} {setup}. Hva gjør {pron} mest sannsynlig nå?", "{name} {setup}. Kva gjer {pron} mest truleg no?"),
         "action"),
    )
    template, kind = rng.choice(templates)
    intro = _pick(rng, V.CSQA_INTROS, lang) if rng.random() < 0.3 else ""
    options = [pair[lang] for pair in rng.sample(V.CSQA_ANSWERS[kind], 5)]
    choices, answer = _labelled(rng, options[0], options[1:])
    return {"question": intro + template[lang].format(**slots), "choices": choices, "answer": answer}


def _obqa(rng: random.Random, lang: int) -> dict[str, Any]:
    ci = rng.randrange(len(V.OBQA_CLASSES))
    fact, questions, members = V.OBQA_CLASSES[ci]
    correct = rng.choice(members)[lang]
    wrong: list[str] = []
    for j in rng.sample([j for j in range(len(V.OBQA_CLASSES)) if j != ci], len(V.OBQA_CLASSES) - 1):
        option = rng.choice(V.OBQA_CLASSES[j][2])[lang]
        if option != correct and option not in wrong:  # an iron nail is both metal and magnetic
            wrong.append(option)
        if len(wrong) == 3:
            break
    intro = _pick(rng, V.OBQA_INTROS, lang).format(name=_person(rng, lang)[0])
    choices, answer = _labelled(rng, correct, wrong)
    return {"question_stem": intro + rng.choice(questions)[lang], "choices": choices, "answer": answer, "fact": fact[lang]}


def _tqa(rng: random.Random, lang: int) -> dict[str, Any]:
    k = rng.choices(list(_TQA_CHOICES), weights=list(_TQA_CHOICES.values()))[0]
    if rng.random() < 0.5:
        action = _pick(rng, V.TQA_ACTIONS, lang)
        subject = rng.choice(["du", _person(rng, lang)[0], ("man", "ein")[lang]])
        question = _pick(rng, V.TQA_ACTION_QUESTIONS, lang).format(s=subject, action=action)
        correct = _pick(rng, V.TQA_TRUTHS_ACTION, lang).format(s=subject, action=action)
        cap = subject[:1].upper() + subject[1:]
        pool = [p[lang].format(S=cap) for p in V.TQA_FALSE_OUTCOMES]
    else:
        claim = _pick(rng, V.TQA_CLAIMS, lang)
        who = rng.choice([_person(rng, lang)[0], _pick(rng, V.TQA_SOURCES, lang)])
        question = _pick(rng, V.TQA_CLAIM_QUESTIONS, lang).format(claim=claim, who=who)
        correct = _pick(rng, V.TQA_TRUTHS_CLAIM, lang).format(claim=claim)
        pool = [p[lang].format(claim=claim) for p in V.TQA_FALSE_CLAIM]
    wrong = rng.sample(pool, min(k - 1, len(pool)))
    return {"question": question, "mc1_targets": {"choices": [correct, *wrong], "labels": [1] + [0] * len(wrong)}}


def _nrk(rng: random.Random, lang: int) -> dict[str, Any]:
    k = rng.choices(list(_NRK_CHOICES), weights=list(_NRK_CHOICES.values()))[0]
    kind = rng.choices(("year", "name", "person", "count", "sport"), weights=(2, 2, 3, 1, 3))[0]
    if kind == "year":
        question = ("Hvilket år {e}?", "Kva år {e}?")[lang].format(e=_pick(rng, V.NRK_YEAR_EVENTS, lang))
        base = rng.randint(1800, 2020)
        options = [str(y) for y in [base, *rng.sample([base + d for d in range(-60, 61) if d], k - 1)]]
    elif kind == "name":
        things, names = V.NRK_NAME_THINGS[rng.choice(sorted(V.NRK_NAME_THINGS))]
        question = ("Hva heter {t}?", "Kva heiter {t}?")[lang].format(t=_pick(rng, things, lang))
        options = rng.sample(names, k)
    elif kind == "person":
        title = f"{rng.choice(V.NRK_TITLE_WORDS[0])} {rng.choice(V.NRK_TITLE_WORDS[1])}"
        question = ("Hvem {d}?", "Kven {d}?")[lang].format(d=_pick(rng, V.NRK_PERSON_DEEDS, lang).format(title=title))
        options = rng.sample(V.NRK_PERSONS, k)
    elif kind == "count":
        pair, value = rng.choice(V.NRK_COUNT_QUESTIONS)
        question = pair[lang]
        near = sorted({max(1, value + d * max(1, value // 10)) for d in range(-6, 7)} - {value})
        options = [str(v) for v in [value, *rng.sample(near, k - 1)]]
    else:
        event = _pick(rng, V.NRK_SPORT_EVENTS, lang).format(year=rng.randint(1960, 2024))
        question = ("Hvilket land vant {e}?", "Kva land vann {e}?")[lang].format(e=event)
        options = [p[lang] for p in rng.sample(V.NRK_COUNTRIES, k)]
    choices, answer = _labelled(rng, options[0], options[1:])
    quiz = _pick(rng, V.NRK_QUIZZES, lang).format(n=rng.randint(1, 52))
    return {"question": _pick(rng, V.NRK_LEADS, lang) + question, "choices": choices, "answer": answer, "quiz": quiz}


_MAKERS: dict[str, Callable[[random.Random, int], dict[str, Any]]] = {
    "norcommonsenseqa": _csqa, "noropenbookqa": _obqa, "nortruthfulqa_mc": _tqa, "nrk_quiz_qa": _nrk,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fjordtune.eval.synthetic",
        description="Write deterministic synthetic NorEval-format data (the 4 multiple-choice families, nb and nn) "
        "in the layout eval.data_dir reads, sized like the real test sets at --scale 1.0 (7,032 scored documents "
        "per prompt). For benchmarks: scores on it mean nothing.",
    )
    p.add_argument("out", metavar="OUT", help="folder to write (<OUT>/ltg/<dataset>/<nb|nn>/<split>.jsonl)")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the real sizes, in (0, 1] (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="RNG seed (default 0); same seed, same bytes")
    args = p.parse_args(argv)
    try:
        written = write_synthetic_noreval(args.out, scale=args.scale, seed=args.seed)
    except ValueError as e:
        p.error(str(e))
    for rel, rows in written.items():
        print(f"{rows:6d}  {Path(args.out) / rel}")
    docs = num_scored_docs(scale=args.scale)
    print(f"scored documents per prompt: {sum(docs.values())} ({', '.join(f'{k} {v}' for k, v in docs.items())}); "
          f"x 5 prompts = {5 * sum(docs.values())} task-docs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
