#!/usr/bin/env python
"""The NorEval contamination check at scale: index build and check time, memory, and hits found.

    .venv/bin/python scripts/bench_contamination.py [--scales 1,10,100] [--rows 13375] [--planted 10] [--json out.json]

Writes the full-size synthetic NorEval (`fjordtune.eval.synthetic`, scale 1.0: 7,434 items in every split a
task reads) into a temporary folder, then for each scale s builds the index from the files (timed: reading
and indexing) and checks `rows x s` training chat rows streamed from a generator (never held in memory),
of which `planted x s` contain a NorEval item (one of six kinds, below) and the rest are clean.

The clean rows (`clean_rows`) are Norwegian instructions and answers of 50-300 words, Bokmål and Nynorsk,
built from the synthetic generator's word lists (names, places, quiz subjects, myths, school-science
objects) in sentence templates of their own, plus near misses: short quiz questions of the eval's own
wording with one answer. They are not eval data, so every hit in them is a false positive.

Planted rows (`plant`), each built from one eval item chosen so that it should give exactly one hit:
  exact      the question copied as the user turn
  noisy      the same in upper case, with other spacing and punctuation
  ngram      13 words from inside a longer question or answer, within an assistant reply of other words
  reordered  a long question with its choices in reverse order
  short      a short question (< min_words words) with its choices shuffled: the `question+choices` rule
  nn_in_nb   a Nynorsk question in a row labelled Bokmål ("Svar på bokmål.", "lang": "nb")

Printed per scale: rows, seconds (index, check; generating the rows is timed apart and left out), rows/s,
peak RSS of the check (the kernel's high-water mark, reset before each scale), rows flagged, hits, clean
rows flagged (false+, each listed after the table) and planted rows missed. The script fails when a
planted row is missed or gives another record than its one expected hit. Results: docs/benchmarks.md,
"Contamination check". `tests/test_contamination.py` imports `clean_rows` and `plant` from here.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fjordtune.data.contamination import EvalIndex, check_rows, eval_texts_from_dir, normalise
from fjordtune.eval import _synthetic_vocab as V
from fjordtune.eval.noreval import FAMILIES
from fjordtune.eval.synthetic import write_synthetic_noreval
from fjordtune.telemetry.rss import reset_peak_rss, status_bytes

MiB = 1 << 20
TRAIN_FILE = "synthetic-train.jsonl"
PLANT_KINDS = ("exact", "noisy", "ngram", "reordered", "short", "nn_in_nb")

# ------------------------------------------------------------------ clean rows

# (Bokmål, Nynorsk) templates, none of which is an eval template: the clean rows share words and slot
# phrases with NorEval (as real Norwegian instruction data would) but never an eval sentence.
_SYSTEM = (("Du er en hjelpsom assistent som svarer kort og presist.", "Du er ein hjelpsam assistent som svarar kort og presist."),
           ("Svar på bokmål.", "Svar på nynorsk."), ("Du hjelper elever med skolearbeid.", "Du hjelper elevar med skulearbeid."))
_ASK = (
    ("Skriv et kort avsnitt om hva man bør tenke på når man {situation}.",
     "Skriv eit kort avsnitt om kva ein bør tenkje på når ein {situation}."),
    ("Fortell en liten historie om {name} og en helt vanlig dag {time}.",
     "Fortel ei lita historie om {name} og ein heilt vanleg dag {time}."),
    ("Hva vet du om forfatteren {person}?", "Kva veit du om forfattaren {person}?"),
    ("Kan du forklare hvorfor så mange tror at {claim}?", "Kan du forklare kvifor så mange trur at {claim}?"),
    ("Gi meg noen tips til hvordan jeg kan {task}.", "Gje meg nokre tips til korleis eg kan {task}."),
    ("Lag en kort tekst om {place} som turmål.", "Lag ein kort tekst om {place} som turmål."),
    ("Skriv noen linjer om idrett i {country}.", "Skriv nokre liner om idrett i {country}."),
    ("Forklar kort hva {member} har med naturfag å gjøre.", "Forklar kort kva {member} har med naturfag å gjere."),
)
_SAY = (
    ("{name} pleier å {task} {time}, og {pron} synes det er både nyttig og hyggelig.",
     "{name} pleier å {task} {time}, og {pron} synest det er både nyttig og hyggeleg."),
    ("Når man {situation}, kan det være lurt å ha god tid.", "Når ein {situation}, kan det vere lurt å ha god tid."),
    ("Mange oppbevarer {obj} {where}, men det finnes andre gode løsninger også.",
     "Mange oppbevarer {obj} {where}, men det finst andre gode løysingar òg."),
    ("{person} er fortsatt mye lest, og mange elever møter forfatterskapet på skolen.",
     "{person} er framleis mykje lesen, og mange elevar møter forfattarskapen på skulen."),
    ("Det er en utbredt oppfatning at {claim}, men saken er mer sammensatt enn som så.",
     "Det er ei utbreidd oppfatning at {claim}, men saka er meir samansett enn som så."),
    ("Legen forklarte at det sjelden er noe å bekymre seg for om man {action}.",
     "Legen forklarte at det sjeldan er noko å uroe seg for om ein {action}."),
    ("{place} er et populært sted for både bading og fisking om sommeren.",
     "{place} er ein populær stad for både bading og fisking om sommaren."),
    ("I {year} {event}, og det snakker mange om ennå.", "I {year} {event}, og det snakkar mange om enno."),
    ("{country} har mange dyktige utøvere, og landslaget trener hardt {time}.",
     "{country} har mange dyktige utøvarar, og landslaget trenar hardt {time}."),
    ("{member} er et eksempel læreren ofte bruker i timene.", "{member} er eit døme læraren ofte brukar i timane."),
    ("Det er lurt å planlegge godt før man setter i gang.", "Det er lurt å planleggje godt før ein set i gang."),
    ("Hvis man {risky}, bør man tenke seg om neste gang.", "Om ein {risky}, bør ein tenkje seg om neste gong."),
    ("{name} fortalte at {pron} ble {feeling} da {pron} kom hjem {time}.",
     "{name} fortalde at {pron} vart {feeling} då {pron} kom heim {time}."),
    ("Mange synes dette er et spennende tema å lese mer om.", "Mange synest dette er eit spennande tema å lese meir om."),
)
# near misses: short quiz questions worded as in NRK Quiz (under min_words words), with one answer only
_QUIZ = (("Hva heter {thing}?", "Kva heiter {thing}?"), ("Hvem skrev romanen «{title}»?", "Kven skreiv romanen «{title}»?"))
_QUIZ_ANSWER = ("Svaret er {answer}. ", "Svaret er {answer}. ")


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]


def _slots(rng: random.Random, lang: int) -> dict[str, str]:
    def pick(pairs: tuple[V.Pair, ...]) -> str:
        return rng.choice(pairs)[lang]

    name, female = rng.choice(V.NAMES)
    things, places = V.NRK_NAME_THINGS[rng.choice(sorted(V.NRK_NAME_THINGS))]
    members = rng.choice(V.OBQA_CLASSES)[2]
    return {
        "name": name, "pron": (V.SHE if female else V.HE)[lang], "time": pick(V.TIMES),
        "situation": pick(V.CSQA_SITUATIONS), "task": pick(V.CSQA_TASKS), "obj": pick(V.CSQA_OBJECTS_DEF),
        "where": _lower_first(pick(V.CSQA_ANSWERS["place"])), "risky": pick(V.CSQA_RISKY),
        "feeling": _lower_first(pick(V.CSQA_ANSWERS["feeling"])), "person": rng.choice(V.NRK_PERSONS),
        "claim": pick(V.TQA_CLAIMS), "action": pick(V.TQA_ACTIONS), "place": rng.choice(places),
        "country": pick(V.NRK_COUNTRIES), "member": pick(members), "year": str(rng.randint(1800, 2024)),
        "event": pick(V.NRK_YEAR_EVENTS), "thing": pick(things),
        "title": f"{rng.choice(V.NRK_TITLE_WORDS[0])} {rng.choice(V.NRK_TITLE_WORDS[1])}",
    }


def clean_text(rng: random.Random, lang: int, num_words: int) -> str:
    """Sentences of `_SAY` until `num_words` words."""
    out: list[str] = []
    words = 0
    while words < num_words:
        sentence = rng.choice(_SAY)[lang].format(**_slots(rng, lang))
        out.append(sentence[:1].upper() + sentence[1:])
        words += sentence.count(" ") + 1
    return " ".join(out)


def clean_row(rng: random.Random) -> dict[str, Any]:
    """One clean chat row of 50-300 words: maybe a system turn, an instruction (or a near-miss quiz
    question and its answer), an answer."""
    lang = int(rng.random() < 0.25)
    slots = _slots(rng, lang)
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(_SYSTEM)[lang]})
    lead = ""
    if rng.random() < 0.1:
        quiz = rng.randrange(len(_QUIZ))
        ask = _QUIZ[quiz][lang].format(**slots)
        lead = _QUIZ_ANSWER[lang].format(answer=slots["person"] if quiz else slots["place"])
    else:
        ask = rng.choice(_ASK)[lang].format(**slots)
    so_far = sum(len(m["content"].split()) for m in messages) + len(ask.split()) + len(lead.split())
    # a sentence has at most 23 words: aiming at 50-277 keeps the row within 50-300
    answer = lead + clean_text(rng, lang, rng.randint(50, 277) - so_far)
    messages += [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def clean_rows(num_rows: int, *, seed: int = 1) -> Iterator[dict[str, Any]]:
    """`num_rows` clean rows, made one at a time (deterministic for a seed)."""
    rng = random.Random(f"fjordtune-bench-contamination:{seed}")
    for _ in range(num_rows):
        yield clean_row(rng)


# ------------------------------------------------------------------ planted rows


def _question(row: dict[str, Any]) -> str:
    return row.get("question") or row["question_stem"]


def _options(row: dict[str, Any]) -> list[str]:
    return list(row["choices"]["text"]) if "choices" in row else list(row["mc1_targets"]["choices"])


def plant(kind: str, family: str, config: str, split: str, row: dict[str, Any], rng: random.Random, *,
          min_words: int = 8, ngram: int = 13) -> tuple[dict[str, Any], tuple[str, str, str, str, str, str]]:
    """A chat row that contains eval `row` the `kind` way, and the hit it must give:
    (dataset, config, split, id, field, kind)."""
    dataset = FAMILIES[family].dataset_id
    rid = str(row["id"])
    question = _question(row)
    filler = clean_text(rng, 0, rng.randint(40, 120))
    messages: list[dict[str, str]] = []
    extra: dict[str, Any] = {}
    if kind in ("exact", "nn_in_nb"):
        if kind == "nn_in_nb":
            messages.append({"role": "system", "content": "Svar på bokmål."})
            extra["lang"] = "nb"
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": filler}]
        expect = ("question", "substring")
    elif kind == "noisy":
        noisy = "  ".join(question.upper().replace("?", " ?!").replace(",", " ;").replace(".", " …").split(" "))
        messages += [{"role": "user", "content": f"«{noisy}»\n\n"}, {"role": "assistant", "content": filler}]
        expect = ("question", "substring")
    elif kind == "ngram":
        field, text = _long_text(row, ngram + 2)
        gram = " ".join(normalise(text).split(" ")[1:1 + ngram])
        messages += [{"role": "user", "content": rng.choice(_ASK)[0].format(**_slots(rng, 0))},
                     {"role": "assistant", "content": f"{filler} {gram[:1].upper()}{gram[1:]}. {filler}"}]
        expect = (field, "ngram")
    elif kind in ("reordered", "short"):
        options = _options(row)
        order = list(reversed(options)) if kind == "reordered" else rng.sample(options, len(options))
        listed = "\n".join(f"{chr(65 + i)}) {o}" for i, o in enumerate(order))
        messages += [{"role": "user", "content": f"{question}\n{listed}"},
                     {"role": "assistant", "content": f"Svaret er {options[0]}. {filler}"}]
        expect = ("question", "substring") if kind == "reordered" else ("question+choices", "substring")
    else:
        raise ValueError(f"unknown plant kind {kind!r}; one of {PLANT_KINDS}")
    return {**extra, "messages": messages}, (dataset, config, split, rid, *expect)


def _long_text(row: dict[str, Any], num_words: int) -> tuple[str, str]:
    """(field, text) of the first field of the row with at least `num_words` words."""
    fields = [("question", _question(row))] + [(f"answers[{i}]", a) for i, a in
                                               enumerate(row.get("mc1_targets", {}).get("choices", []))]
    return next((f, t) for f, t in fields if len(normalise(t).split(" ")) >= num_words)


def read_eval(data_dir: Path) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(family, config, split, row) of every NorEval row under `data_dir`."""
    out = []
    for family in FAMILIES.values():
        for config in ("nb", "nn"):
            for split in family.splits:
                path = data_dir / family.dataset_id / config / f"{split}.jsonl"
                if path.is_file():
                    out += [(family.name, config, split, json.loads(line))
                            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out


def plant_sources(data_dir: Path, *, min_words: int = 8, ngram: int = 13) -> dict[str, list[tuple[str, str, str, dict]]]:
    """Eval rows fit for each plant kind, chosen so that the planted row has exactly one hit.

    The synthetic set is made from templates, so most questions share 13-grams with other items'
    questions, or hold a shorter question whole (an OpenBookQA stem with and without its intro): a row
    holding such a question rightly hits several items. Kept here: the question (or, for `ngram`, the
    13 words planted) belongs to one item, shares no 13-gram with any other eval text and holds no other
    eval text of min_words..ngram-1 words; its choices are all shorter than min_words. Worked out by
    brute force over the files, apart from the index under test."""
    rows = read_eval(data_dir)
    owners: Counter[str] = Counter()  # normalised text -> rows having it in some field
    for _, _, _, row in rows:
        owners.update({normalise(t) for t in [_question(row), *_options(row), row.get("fact") or ""]} - {""})
    grams: Counter[tuple[str, ...]] = Counter()  # n-gram -> distinct texts having it
    whole: set[tuple[str, ...]] = set()  # texts matched whole only
    for text in owners:
        w = tuple(text.split(" "))
        if len(w) >= ngram:
            grams.update({w[i:i + ngram] for i in range(len(w) - ngram + 1)})
        elif len(w) >= min_words:
            whole.add(w)

    def one_hit(w: tuple[str, ...]) -> bool:
        """Would a row holding these words (part or all of one text) hit that text only?"""
        if any(grams[w[i:i + ngram]] > 1 for i in range(len(w) - ngram + 1)):
            return False
        return not any(w[i:i + k] in whole and w[i:i + k] != w for k in range(min_words, min(ngram, len(w) + 1))
                       for i in range(len(w) - k + 1))

    out: dict[str, list[tuple[str, str, str, dict]]] = {k: [] for k in PLANT_KINDS}
    for family, config, split, row in rows:
        q = normalise(_question(row))
        w = tuple(q.split(" "))
        opts = [len(normalise(o).split(" ")) for o in _options(row)]
        if owners[q] != 1 or max(opts) >= min_words:
            continue
        entry = (family, config, split, row)
        if len(w) >= min_words and one_hit(w):
            out["nn_in_nb" if config == "nn" else "exact"].append(entry)
            out["noisy"].append(entry)
            out["reordered"].append(entry)
        if len(w) < min_words <= len(w) + sum(opts):
            out["short"].append(entry)
        if len(w) >= ngram + 2 and one_hit(w[1:1 + ngram]):
            out["ngram"].append(entry)
    return out


def training_rows(num_rows: int, num_planted: int, sources: dict[str, list[tuple[str, str, str, dict]]], *,
                  seed: int = 1, timer: list[float] | None = None,
                  expected: dict[int, tuple[str, ...]] | None = None) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(file, line, row) of `num_rows` rows, `num_planted` of them planted at evenly spaced lines
    (kinds in turn, sources in turn); made as they are read. `timer[0]` gathers the seconds spent making
    them; `expected` gets {line: expected hit}."""
    rng = random.Random(f"fjordtune-bench-contamination:plant:{seed}")
    clean = clean_rows(num_rows, seed=seed)
    every = max(1, num_rows // max(1, num_planted))
    planted = 0
    for line in range(1, num_rows + 1):
        t0 = time.perf_counter()
        row = next(clean)
        if planted < num_planted and line % every == every // 2:
            kind = PLANT_KINDS[planted % len(PLANT_KINDS)]
            pool = sources[kind]
            family, config, split, src = pool[(planted // len(PLANT_KINDS) * 7919) % len(pool)]
            row, hit = plant(kind, family, config, split, src, rng)
            if expected is not None:
                expected[line] = hit
            planted += 1
        if timer is not None:
            timer[0] += time.perf_counter() - t0
        yield TRAIN_FILE, line, row


# ------------------------------------------------------------------ the benchmark






def run_scale(data_dir: Path, scale: int, args: argparse.Namespace) -> dict[str, Any]:
    reset_peak_rss()
    t0 = time.perf_counter()
    index = EvalIndex(eval_texts_from_dir(data_dir), ngram=args.ngram, min_words=args.min_words)
    index_s = time.perf_counter() - t0
    sources = plant_sources(data_dir, min_words=args.min_words, ngram=args.ngram)
    num_rows, num_planted = args.rows * scale, args.planted * scale
    timer, expected = [0.0], {}
    result = check_rows(training_rows(num_rows, num_planted, sources, seed=args.seed, timer=timer,
                                      expected=expected), index)
    check_s = result.seconds - timer[0]
    flagged = {line for _, line in result.contaminated_rows}
    got = {(h.train_line, h.eval_dataset, h.eval_config, h.eval_split, h.eval_id, h.field, h.kind) for h in result.hits}
    want = {(line, *hit) for line, hit in expected.items()}
    false_hits = [h.to_dict() for h in result.hits if h.train_line not in expected]
    return {
        "scale": scale, "rows": num_rows, "eval_items": index.num_items, "index_s": index_s, "check_s": check_s,
        "generate_s": timer[0], "rows_per_s": num_rows / check_s, "peak_rss_mib": status_bytes("VmHWM") / MiB,
        "planted": len(expected), "flagged": len(flagged), "hits": len(result.hits),
        "false_positive_rows": len(flagged - set(expected)), "missed": len(want - got),
        # every planted row gives exactly its one expected record
        "planted_exact": {g for g in got if g[0] in expected} == want,
        "false_positive_hits": false_hits,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Time the NorEval contamination check (fjordtune.data.contamination): build the index from the "
        "full-size synthetic NorEval, check ROWS x SCALE generated training chat rows with PLANTED x SCALE "
        "planted contaminations, print index and check seconds, rows/s, peak RSS, the hits found (each planted row "
        "must give exactly its expected record; the script fails otherwise) and the clean rows flagged (false+).")
    p.add_argument("--scales", default="1,10,100", help="row multipliers, comma-separated (default 1,10,100; "
                   "--scales 1 for a quick run)")
    p.add_argument("--rows", type=int, default=13_375, help="training rows at scale 1 (default 13375)")
    p.add_argument("--planted", type=int, default=10, help="contaminated rows at scale 1 (default 10)")
    p.add_argument("--seed", type=int, default=1, help="seed of the training rows (default 1)")
    p.add_argument("--ngram", type=int, default=13, help="n-gram length (default 13)")
    p.add_argument("--min-words", type=int, default=8, help="shortest eval text matched on its own (default 8)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    scales = [int(s) for s in args.scales.split(",") if s.strip()]
    results = []
    with tempfile.TemporaryDirectory(prefix="fjordtune-bench-contamination-") as tmp:
        data_dir = Path(tmp) / "noreval"
        written = write_synthetic_noreval(data_dir, scale=1.0)
        print(f"synthetic NorEval: {sum(written.values())} rows in {len(written)} files; python "
              f"{platform.python_version()}, {platform.machine()}", flush=True)
        print(f"{'rows':>10} {'index s':>8} {'check s':>8} {'rows/s':>9} {'gen s':>7} {'peak RSS':>9} "
              f"{'planted':>7} {'flagged':>7} {'hits':>6} {'false+':>6} {'missed':>6}", flush=True)
        for scale in scales:
            r = run_scale(data_dir, scale, args)
            results.append(r)
            print(f"{r['rows']:>10,} {r['index_s']:>8.2f} {r['check_s']:>8.2f} {r['rows_per_s']:>9,.0f} "
                  f"{r['generate_s']:>7.1f} {r['peak_rss_mib']:>6.0f} MiB {r['planted']:>7} {r['flagged']:>7} "
                  f"{r['hits']:>6} {r['false_positive_rows']:>6} {r['missed']:>6}", flush=True)
    for r in results:
        for h in r["false_positive_hits"][:5]:
            print(f"false positive at scale {r['scale']}: line {h['train_line']}: {h['eval_dataset']} "
                  f"{h['eval_config']}/{h['eval_split']} {h['eval_id']} {h['field']}: {h['span']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    # a planted row missed, or found with another record, is a failure; a clean row flagged is reported above
    bad = [r["scale"] for r in results if r["missed"] or not r["planted_exact"]]
    if bad:
        print(f"FAILED: planted rows not found as planted at scale(s) {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
