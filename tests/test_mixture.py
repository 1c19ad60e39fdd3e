"""`fjordtune.data.sources` and `fjordtune.data.mixture`: streaming sources, deterministic mixtures, their
manifest, and the chunks Ray Data tasks read.

Unit tier on real files in tmp_path; the S3 test (a real SeaweedFS, tests/conftest.py) and the memory
test (fresh Python processes) are marked `integration`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fjordtune.config.schema import DataSection
from fjordtune.data import sources
from fjordtune.data.mixture import Plan, manifest_lines, plan_files, plan_mixture
from fjordtune.data.sources import BadRowError, SourceRow, read_chunk
from fjordtune.devstack import S3Server
from fjordtune.errors import UserError
from fjordtune.storage import Store

REPO = Path(__file__).resolve().parents[1]


def chat(question: str, answer: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], **extra}


def numbered(prefix: str, n: int) -> list[dict[str, Any]]:
    return [chat(f"{prefix} spørsmål {i}", f"{prefix} svar nummer {i}", id=f"{prefix}{i}") for i in range(n)]


def write_jsonl(path: Path, rows: list[Any]) -> str:
    """Rows as JSON lines; a str is written as it is (for bad lines)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def plan(tmp_path: Path | None = None, **data: Any) -> Plan:
    return plan_mixture(DataSection(**data), store=Store())


def read_all(p: Plan, **kw: Any) -> list[tuple[int, str, int, dict[str, Any], bool]]:
    return [(rid, r.file, r.line, r.row, held) for rid, r, held in p.rows(store=Store(), **kw)]


def by_source(p: Plan) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in p.manifest["sources"]}


# -- determinism -------------------------------------------------------------------------------------

def test_same_seed_same_mixture_other_seed_another(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", numbered("a", 100))
    b = write_jsonl(tmp_path / "b.jsonl", numbered("b", 60))
    spec = {"sources": [{"path": a, "weight": 0.5}, {"path": b, "count": 80}], "eval_fraction": 0.1}
    one, two = plan(**spec, mixture_seed=3), plan(**spec, mixture_seed=3)
    other = plan(**spec, mixture_seed=4)
    assert one.manifest == two.manifest
    assert json.loads(json.dumps(one.manifest)) == one.manifest  # JSON-able as it is
    assert read_all(one) == read_all(two)
    assert one.held_out.tolist() == two.held_out.tolist()
    assert other.manifest != one.manifest
    assert other.manifest["content_sha256"] != one.manifest["content_sha256"]
    assert [e["sha256"] != f["sha256"] for e, f in zip(one.manifest["sources"], other.manifest["sources"])] == [True] * 2
    assert [e["taken"] for e in one.manifest["sources"]] == [50, 80] == [e["taken"] for e in other.manifest["sources"]]
    # row ids run 0..n-1 in source order, then line order, repeats adjacent
    rows = read_all(one)
    assert [r[0] for r in rows] == list(range(130)) == list(range(one.num_rows))
    assert [r[1] for r in rows] == [a] * 50 + [b] * 80
    lines_b = [r[2] for r in rows[50:]]
    assert lines_b == sorted(lines_b) and set(lines_b) == set(range(1, 61))  # 60 once, 20 of them twice
    assert sorted(Counter(lines_b).values()) == [1] * 40 + [2] * 20


def test_held_out_rows_are_a_fixed_split_that_keeps_copies_together(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", numbered("a", 40))
    p = plan(sources=[{"path": a, "weight": 2}], eval_fraction=0.25, shuffle_seed=7)
    held_lines = {line for _, _, line, _, held in read_all(p) if held}
    trained_lines = {line for _, _, line, _, held in read_all(p) if not held}
    assert len(held_lines) == 10 and not held_lines & trained_lines  # both copies of a row held out together
    assert len(p.held_out) == 20 == p.manifest["held_out"]
    assert p.held_out.tolist() == plan(sources=[{"path": a, "weight": 2}], eval_fraction=0.25,
                                       shuffle_seed=7).held_out.tolist()
    assert plan(train_files=[a], eval_fraction=0.001).manifest["held_out"] == 1  # at least one
    assert plan(train_files=[a]).held_out.tolist() == []
    two = write_jsonl(tmp_path / "two.jsonl", numbered("t", 2))
    with pytest.raises(UserError, match=r"eval_fraction=0.9 holds out 2 of the mixture's 2 distinct rows"):
        plan(train_files=[two], eval_fraction=0.9)


# -- counts: dedup, filters, sampling ------------------------------------------------------------------

def test_dedup_exact_and_normalised_first_occurrence_wins_across_sources(tmp_path: Path) -> None:
    hei = chat("Hei, verden!", "Hei på deg.")
    a = write_jsonl(tmp_path / "a.jsonl", [
        hei,
        chat("Hva heter du?", "Jeg heter Kari."),
        hei,                                                           # exact repeat
        chat("hei   VERDEN", "HEI PÅ DEG!!!"),                         # the same after normalising
        chat("Ｈｅｉ, verden?", "hei – på deg"),                          # NFKC (full-width letters), a dash
    ])
    b = write_jsonl(tmp_path / "b.jsonl", [
        chat("Hva heter du?", "Jeg heter Kari."),                      # exact repeat of a source before
        chat("hva heter du", "jeg heter kari"),                        # normalised repeat of a source before
        chat("Noe nytt", "Ja, noe helt nytt."),
        {"messages": [{"role": "system", "content": "Vær kort."}, *hei["messages"]]},  # a system turn: new
    ])
    seen: list[SourceRow] = []
    p = plan_mixture(DataSection(sources=[{"path": a}, {"path": b, "name": "b"}]), store=Store(), on_row=seen.append)
    s = by_source(p)
    assert (s["a.jsonl"]["duplicates_exact"], s["a.jsonl"]["duplicates_normalised"], s["a.jsonl"]["available"]) == (1, 2, 2)
    assert (s["b"]["duplicates_exact"], s["b"]["duplicates_normalised"], s["b"]["available"]) == (1, 1, 2)
    assert [(r[1], r[2]) for r in read_all(p)] == [(a, 1), (a, 2), (b, 3), (b, 4)]
    assert len(seen) == 9 and [(r.file, r.line) for r in seen][:2] == [(a, 1), (a, 2)]  # on_row sees every row
    exact = by_source(plan(sources=[{"path": a}, {"path": b}], dedup="exact"))
    assert [(e["duplicates_exact"], e["duplicates_normalised"], e["available"]) for e in exact.values()] == [
        (1, 0, 4), (1, 0, 3)]
    none = plan(sources=[{"path": a}, {"path": b}], dedup="none")
    assert none.num_rows == 9 and all(e["duplicates_exact"] == 0 for e in none.manifest["sources"])


def test_length_filters_are_counted(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [
        chat("q1", "ok"),                          # 2 assistant characters: too short for min_chars 5
        chat("q2", "fem tegn"),
        chat("q3" * 30, "lang nok"),               # 68 characters in all: too long for max_chars 50
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q4"},
                      {"role": "assistant", "content": "to"}, {"role": "user", "content": "mer"},
                      {"role": "assistant", "content": "tre"}]},   # 2 + 3 assistant characters: long enough
    ])
    p = plan(train_files=[path], min_chars=5, max_chars=50)
    e = p.manifest["sources"][0]
    assert (e["read"], e["too_short"], e["too_long"], e["available"], e["taken"]) == (4, 1, 1, 2, 2)
    assert [r[2] for r in read_all(p)] == [2, 4]
    assert p.manifest["filters"] == {"min_chars": 5, "max_chars": 50}
    assert plan(train_files=[path], min_chars=0).num_rows == 4


def test_count_beyond_available_repeats_and_weight_two_doubles(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", numbered("a", 3))
    b = write_jsonl(tmp_path / "b.jsonl", numbered("b", 4))
    c = write_jsonl(tmp_path / "c.jsonl", numbered("c", 10))
    p = plan(sources=[{"path": a, "count": 7}, {"path": b, "weight": 2}, {"path": c, "count": 4}])
    rows = read_all(p)
    lines = {name: [r[2] for r in rows if r[1] == f] for name, f in (("a", a), ("b", b), ("c", c))}
    assert sorted(Counter(lines["a"]).values()) == [2, 2, 3] and lines["a"] == sorted(lines["a"])
    assert lines["b"] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert len(lines["c"]) == len(set(lines["c"])) == 4  # fewer than available: no repeats
    assert [e["taken"] for e in p.manifest["sources"]] == [7, 8, 4]
    assert [(e["weight"], e["count"]) for e in p.manifest["sources"]] == [(None, 7), (2.0, None), (None, 4)]
    assert plan(sources=[{"path": c, "weight": 0.25}]).num_rows == 3  # 2.5 rounds half up


# -- bad rows ------------------------------------------------------------------------------------------

BAD_LINES = [
    ('{"messages": [', "not valid JSON"),
    ('{"text": "hei"}', 'expected {"messages": [{"role", "content"}, ...]}'),
    ('{"messages": []}', 'expected {"messages"'),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}',
     "messages[0].content is int, not a string"),
    ('{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     "role 'bot' is not system, user or assistant"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn, so nothing to learn from"),
    ('[1, 2]', 'expected {"messages"'),
]


@pytest.mark.parametrize(("bad_line", "fragment"), BAD_LINES)
def test_bad_row_error_names_file_line_and_what_is_wrong(tmp_path: Path, bad_line: str, fragment: str) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [chat("q", "a"), "", bad_line, chat("q2", "a2")])
    with pytest.raises(BadRowError) as info:
        plan(train_files=[path])
    assert str(info.value).startswith(f"{path}:3: ") and fragment in str(info.value)
    assert isinstance(info.value, UserError)


def test_skipped_bad_rows_are_counted_per_source(tmp_path: Path) -> None:
    bad = [line for line, _ in BAD_LINES]
    a = write_jsonl(tmp_path / "a.jsonl", [chat("q", "a"), *bad, chat("q2", "a2")])
    b = write_jsonl(tmp_path / "b.jsonl", [chat("q3", "a3"), bad[0]])
    lines: list[str] = []
    p = plan_mixture(DataSection(sources=[{"path": a}, {"path": b}], on_bad_row="skip"), store=Store(),
                     progress=lines.append)
    ea, eb = p.manifest["sources"]
    assert (ea["read"], ea["bad_rows_skipped"], ea["taken"]) == (9, 7, 2)
    assert (eb["read"], eb["bad_rows_skipped"], eb["taken"]) == (2, 1, 1)
    assert len(ea["bad_rows_first"]) == 5 and ea["bad_rows_first"][0].startswith(f"{a}:2: not valid JSON")
    assert ea["bad_rows_first"][4] == f"{a}:6: role 'bot' is not system, user or assistant (messages[0])"
    assert eb["bad_rows_first"] == [f"{b}:2: not valid JSON (Expecting value)"]
    assert lines[0] == "data: a.jsonl: 9 rows read, 7 bad skipped -> 2 available, 2 taken"
    assert [r[2] for r in read_all(p)] == [1, 9, 1]  # chunks skip the bad lines they span
    assert p.manifest["on_bad_row"] == "skip"


def test_missing_files_name_the_job_key(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", numbered("a", 2))
    with pytest.raises(UserError, match=r"^data.sources\[1\].path: .*nope.jsonl: no such file$"):
        plan(sources=[{"path": a}, {"path": str(tmp_path / "nope.jsonl")}])
    with pytest.raises(UserError, match=r"^data.train_files\[0\]: .*nope.parquet: no such file$"):
        plan(train_files=[str(tmp_path / "nope.parquet")])
    with pytest.raises(UserError, match=r"^data.sources\[0\].hf: .*: no such dataset or folder"):
        plan(sources=[{"hf": str(tmp_path / "no-such-folder")}])
    with pytest.raises(UserError, match=r"^data.eval_files\[0\]: .*: no such file$"):
        plan_files([str(tmp_path / "nope.jsonl")], key="data.eval_files", store=Store())


def test_plan_files_takes_every_row_once(tmp_path: Path) -> None:
    rows = numbered("e", 5)
    path = write_jsonl(tmp_path / "eval.jsonl", [*rows, rows[0], chat("q", "")])  # a repeat, an empty reply
    p = plan_files([path], key="data.eval_files", store=Store())
    assert p.num_rows == 7 and [r[2] for r in read_all(p)] == list(range(1, 8))
    assert p.manifest["dedup"] == "none" and p.held_out.tolist() == []
    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(UserError, match=r"data.eval_files: .*empty.jsonl: no rows"):
        plan_files([empty], key="data.eval_files", store=Store())


# -- Parquet and datasets ------------------------------------------------------------------------------

def test_parquet_and_hf_folder_give_the_jsonl_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    rows = numbered("p", 40) + [numbered("p", 1)[0]]  # ends with an exact repeat
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=7)
    (tmp_path / "hf").mkdir()
    pq.write_table(table, tmp_path / "hf" / "train.parquet", row_group_size=7)

    plans = {kind: plan(sources=[{kind.split(":")[0]: path, "weight": 0.6}], mixture_seed=5)
             for kind, path in (("path", jsonl), ("path:parquet", str(tmp_path / "rows.parquet")),
                                ("hf", str(tmp_path / "hf")))}
    manifests = [p.manifest for p in plans.values()]
    assert len({m["content_sha256"] for m in manifests}) == 1
    assert [(e["read"], e["duplicates_exact"], e["taken"]) for m in manifests for e in m["sources"]] == [(41, 1, 24)] * 3
    want = [(line, row) for _, _, line, row, _ in read_all(plans["path"])]
    for kind in ("path:parquet", "hf"):
        assert [(line, row) for _, _, line, row, _ in read_all(plans[kind], max_rows=5)] == want
    hf_rows = read_all(plans["hf"])
    assert hf_rows[0][1] == f"hf:{tmp_path / 'hf'}:train"
    assert plans["hf"].manifest["sources"][0]["split"] == "train"


# -- chunks ------------------------------------------------------------------------------------------

def test_chunks_read_exactly_the_selected_rows_in_row_id_order(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", numbered("a", 200))
    b = write_jsonl(tmp_path / "b.jsonl", numbered("b", 30))
    p = plan(sources=[{"path": a, "weight": 0.3}, {"path": b, "count": 45}], eval_fraction=0.1, mixture_seed=1)
    by_line = {f: dict(enumerate(Path(f).read_text(encoding="utf-8").splitlines(keepends=True), 1)) for f in (a, b)}
    held = set(p.held_out.tolist())
    for max_rows in (1, 7, 2000):
        chunks = p.chunks(max_rows)
        assert all(len(c["line_steps"]) <= max_rows for c in chunks)
        got = []
        for chunk in chunks:
            chunk = json.loads(json.dumps(chunk))  # what a Ray task receives
            for row_id, row in read_chunk(chunk, store=Store()):
                got.append((row_id, row.file, row.line, row_id in set(chunk["held"])))
                assert json.loads(by_line[row.file][row.line]) == row.row
                raw = Path(row.file).read_bytes()[row.offset : row.offset + row.length]
                assert raw.decode() == by_line[row.file][row.line]
        assert [g[0] for g in got] == list(range(p.num_rows)) == list(range(60 + 45))
        assert [g[3] for g in got] == [i in held for i in range(p.num_rows)]
        assert [(f, line) for _, f, line, _ in got] == [(r[1], r[2]) for r in read_all(p)]


def test_chunk_byte_ranges_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = write_jsonl(tmp_path / "big.jsonl", [chat(f"q{i}", "x" * 3000) for i in range(2000)])  # 6 MB
    dense = plan(train_files=[big])
    assert len(dense.chunks()) == 1 and dense.chunks()[0]["end"] == Path(big).stat().st_size
    assert all(c["end"] - c["start"] <= 100_000 for c in dense.chunks(max_bytes=100_000))
    assert 60 < len(dense.chunks(max_bytes=100_000)) < 70  # 6 MB in spans of at most 100 kB
    # a sparse sample is cut where it skips much, so it reads what it takes, not the file
    monkeypatch.setattr("fjordtune.data.mixture.CHUNK_MAX_GAP_BYTES", 10_000)
    sparse = plan(sources=[{"path": big, "count": 5}]).chunks()
    assert len(sparse) == 5 and all(c["end"] - c["start"] < 3100 for c in sparse)


def test_a_source_changed_after_planning_is_an_error(tmp_path: Path) -> None:
    rows = numbered("a", 20)
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    p = plan(train_files=[path])
    rows[3] = chat("a spørsmål 3", "a svar nummer 9")  # same length, other content
    write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(UserError, match=r"a.jsonl: changed since the mixture was planned \(rows 0-19: its content"):
        list(p.rows(store=Store()))


def test_progress_and_manifest_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fjordtune.data.mixture.PROGRESS_EVERY", 10)
    a = write_jsonl(tmp_path / "no_alpaca.jsonl", numbered("a", 25) + [numbered("a", 1)[0], chat("q", "")])
    lines: list[str] = []
    p = plan_mixture(DataSection(sources=[{"path": a, "count": 10}]), store=Store(), progress=lines.append)
    assert lines == ["data: no_alpaca.jsonl: 10 rows read so far", "data: no_alpaca.jsonl: 20 rows read so far",
                     "data: no_alpaca.jsonl: 27 rows read, 1 duplicate, 1 too short -> 25 available, 10 taken"]
    table = manifest_lines(p.manifest)
    assert table[0].split() == ["source", "read", "bad", "dup", "norm", "short", "long", "available", "taken",
                                "sha256"]
    assert table[1].split()[:9] == ["no_alpaca.jsonl", "27", "0", "1", "0", "1", "0", "25", "10"]
    assert table[-1].startswith("10 rows (0 held out), seed 0, dedup normalised, min_chars 1")


# -- S3 ----------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_s3_jsonl_streams_and_reads_one_ranged_get_per_chunk(
        tmp_path: Path, s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store()
    prefix = f"s3://fjordtune-mixture/{uuid.uuid4().hex[:12]}"
    store.ensure_bucket(prefix)
    local = write_jsonl(tmp_path / "rows.jsonl", [*numbered("s", 300), "", '{"broken', *numbered("t", 50)])
    data = Path(local).read_bytes()
    store.write_bytes(f"{prefix}/rows.jsonl", data)
    pq.write_table(pa.Table.from_pylist(numbered("s", 300)), tmp_path / "rows.parquet", row_group_size=64)
    store.write_bytes(f"{prefix}/rows.parquet", (tmp_path / "rows.parquet").read_bytes())

    assert store.read_range(f"{prefix}/rows.jsonl", 10, 50) == data[10:50]
    assert store.read_range(f"{prefix}/rows.jsonl", len(data) - 5, len(data) + 100) == data[-5:]
    assert store.read_range(f"{prefix}/rows.jsonl", len(data), len(data) + 100) == b""
    assert store.read_range(local, 10, 50) == data[10:50] and store.read_range(local, len(data), len(data) + 9) == b""
    with pytest.raises(UserError, match="no such object"):
        store.read_range(f"{prefix}/nope.jsonl", 0, 10)

    # stream the object in blocks smaller than a line, so lines straddle blocks
    monkeypatch.setattr(sources, "STREAM_BLOCK", 97)
    spec = {"sources": [{"path": f"{prefix}/rows.jsonl", "weight": 0.5}], "on_bad_row": "skip", "mixture_seed": 2}
    remote = plan_mixture(DataSection(**spec), store=store)
    here = plan_mixture(DataSection(**{**spec, "sources": [{"path": local, "weight": 0.5}]}), store=store)
    assert remote.manifest["content_sha256"] == here.manifest["content_sha256"]
    assert remote.manifest["sources"][0]["bad_rows_first"] == [f"{prefix}/rows.jsonl:302: not valid JSON "
                                                               "(Unterminated string starting at)"]
    with pytest.raises(UserError, match=r"^data.sources\[0\].path: s3://.*/nope.jsonl: no such object$"):
        plan_mixture(DataSection(sources=[{"path": f"{prefix}/nope.jsonl"}]), store=store)

    gets: list[str] = []
    store.s3.meta.events.register("before-send.s3.GetObject",
                                  lambda request, **_: gets.append(request.headers.get("Range", b"")))
    chunks = remote.chunks(max_rows=40)
    rows = [(rid, r.line, r.row) for c in chunks for rid, r in read_chunk(c, store=store)]
    assert len(chunks) == 5 and len(gets) == len(chunks)  # one ranged GET per chunk, not one per row
    assert all(str(g).startswith(("bytes=", "b'bytes=")) for g in gets)
    assert rows == [(rid, r.line, r.row) for rid, r, _ in here.rows(store=store, max_rows=40)]

    parquet = plan_mixture(DataSection(sources=[{"path": f"{prefix}/rows.parquet", "count": 100}]), store=store)
    assert parquet.manifest["sources"][0]["read"] == 300
    assert [r.row for _, r, _ in parquet.rows(store=store, max_rows=30)] == [
        r.row for _, r, _ in plan(sources=[{"path": str(tmp_path / "rows.parquet"), "count": 100}]).rows(store=store)]


# -- driver memory ---------------------------------------------------------------------------------------

@pytest.mark.integration
def test_planning_memory_grows_by_bytes_per_row_not_by_the_rows(tmp_path: Path) -> None:
    """Plan 5k and 50k rows of ~1 KB each in fresh processes (scripts/bench_mixture.py's child): the extra
    45k rows may cost at most a quarter of their bytes in the planning process (the design keeps a few
    dozen bytes a row; the rows as Python objects would take several times the file)."""
    def rows(n: int) -> list[dict[str, Any]]:
        return [chat(f"Spørsmål {i} om fjorder og fjell", f"Svar {i}: " + "lang forklaring om norsk natur. " * 30)
                for i in range(n)]

    tiny = write_jsonl(tmp_path / "tiny.jsonl", rows(50))
    growth, size = {}, {}
    for n in (5_000, 50_000):
        path = write_jsonl(tmp_path / f"{n}.jsonl", rows(n))
        size[n] = Path(path).stat().st_size
        out = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_mixture.py"), "--child", "plan", path, tiny],
                             check=True, capture_output=True, text=True, timeout=120)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["rows"] == n
        growth[n] = result["growth"]
    per_row = (growth[50_000] - growth[5_000]) / 45_000
    row_bytes = (size[50_000] - size[5_000]) / 45_000
    print(f"planning: {per_row:.0f} bytes a row, rows are {row_bytes:.0f} bytes; growth {growth}")
    assert per_row < 0.25 * row_bytes, (growth, size)
