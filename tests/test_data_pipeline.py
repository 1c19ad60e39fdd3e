"""A job's data from its sources to each training worker's shard: the contamination gate before any worker
(`fjordtune run`, `fjordtune contamination`), and Ray Data's tokenization and per-worker shards on a real
local Ray cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fjordtune

ROOT = Path(fjordtune.__file__).resolve().parents[2]
DEMO = ROOT / "jobs" / "demo.yaml"
SFT = ROOT / "src" / "fjordtune" / "samples" / "sft" / "demo.jsonl"
NRK_NB = ROOT / "src" / "fjordtune" / "samples" / "noreval" / "ltg" / "nrk_quiz_qa" / "nb" / "test.jsonl"


def fjordtune_cli(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fjordtune", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def contaminated_file(tmp_path: Path, *, at_line: int = 7) -> tuple[Path, dict]:
    """The demo's rows with one planted at `at_line` whose answer quotes a NorEval question verbatim."""
    # the first item whose question is long enough to count on its own (data.contamination.min_words)
    item = next(r for r in map(json.loads, NRK_NB.read_text().splitlines()) if len(r["question"].split()) >= 8)
    rows = SFT.read_text().splitlines()
    planted = {"messages": [{"role": "user", "content": "Lag et quizspørsmål om norsk litteratur."},
                            {"role": "assistant", "content": f"Her er ett: {item['question']} Lykke til!"}]}
    rows.insert(at_line - 1, json.dumps(planted, ensure_ascii=False))
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path, item


def test_run_refuses_contaminated_data_before_any_worker_starts(tmp_path: Path) -> None:
    """Must-show 3: the planted row makes `fjordtune run` exit 2, naming file and line, before Ray starts
    (so before any worker, GPU or download): nothing of the run is in storage but its data record."""
    path, item = contaminated_file(tmp_path, at_line=7)
    store = tmp_path / "store"
    store.mkdir()
    res = fjordtune_cli("run", str(DEMO), "--set", f"storage.uri={store}", "--set", f"data.train_files=[{path}]",
                        "--output-dir", str(tmp_path / "out"), env={"RAY_ADDRESS": ""})
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"{path}:7: contains ltg/nrk_quiz_qa nb/test item {item['id']}" in res.stderr, res.stderr[-3000:]
    assert "refusing to train: 1 of" in res.stderr
    assert "--remove" in res.stderr and "data.allow_contamination" in res.stderr
    assert "Ray: connected" not in res.stdout and "== train" not in res.stdout, res.stdout
    assert not (store / "demo" / "checkpoints").exists() and not (store / "demo" / "base-model").exists()


def test_contamination_cli_json_exit_status_and_remove(tmp_path: Path) -> None:
    path, item = contaminated_file(tmp_path, at_line=3)
    res = fjordtune_cli("contamination", str(DEMO), "--set", f"data.train_files=[{path}]", "--json")
    assert res.returncode == 1, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert set(out) == {"hits", "train_rows", "eval_items", "seconds"}
    assert out["train_rows"] == len(SFT.read_text().splitlines()) + 1
    assert out["eval_items"] >= 50
    hit = out["hits"][0]
    assert (hit["train_file"], hit["train_line"], hit["eval_id"], hit["eval_split"]) == (str(path), 3, item["id"], "test")
    assert set(hit) == {"train_file", "train_line", "eval_dataset", "eval_config", "eval_split", "eval_id", "field",
                        "kind", "span"}

    cleaned = tmp_path / "cleaned"
    res = fjordtune_cli("contamination", str(DEMO), "--set", f"data.train_files=[{path}]", "--remove", str(cleaned))
    assert res.returncode == 1 and "CONTAMINATED: 1 rows" in res.stdout, res.stdout + res.stderr[-2000:]
    removed = [json.loads(line) for line in (cleaned / "removed.jsonl").read_text().splitlines()]
    assert [(r["train_file"], r["train_line"]) for r in removed] == [(str(path), 3)]
    clean_file = cleaned / "train.jsonl"
    assert clean_file.read_text().splitlines() == [json.dumps(json.loads(x), ensure_ascii=False)
                                                   for x in SFT.read_text().splitlines()] or \
        [json.loads(x) for x in clean_file.read_text().splitlines()] == \
        [json.loads(x) for x in SFT.read_text().splitlines()]
    res = fjordtune_cli("contamination", str(DEMO), "--set", f"data.train_files=[{clean_file}]")
    assert res.returncode == 0 and res.stdout.rstrip().endswith("clean"), res.stdout + res.stderr[-2000:]


def test_allowed_contamination_is_planned_and_recorded(tmp_path: Path) -> None:
    """`data.allow_contamination: true`: the check still runs and its hits are in the record the report shows."""
    from fjordtune.config import load_job
    from fjordtune.data.prepare import plan_job_data
    from fjordtune.report import data_section
    from fjordtune.storage import Store

    path, item = contaminated_file(tmp_path)
    job = load_job(DEMO, [f"storage.uri={tmp_path}", f"data.train_files=[{path}]", "data.allow_contamination=true"])
    lines: list[str] = []
    data = plan_job_data(job, store=Store.for_job(job), say=lines.append)
    summary = data.summary()
    assert summary["contamination"]["contaminated_rows"] == 1
    assert summary["contamination"]["first_hits"][0]["eval_id"] == item["id"]
    assert any("training anyway" in line for line in lines)
    section = "\n".join(data_section({"data": summary}))
    assert "1 rows contain NorEval items" in section and f"`{path}:7`" in section
    assert summary["manifest"]["rows"] == len(SFT.read_text().splitlines()) + 1


# -- Ray Data: tokenization and per-worker shards ------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    import ray

    saved = dict(os.environ)
    os.environ.update(FJORDTUNE_CACHE=str(tmp_path_factory.mktemp("cache")), RAY_AUTH_MODE="disabled")
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()
    os.environ.clear()
    os.environ.update(saved)


def _run_shards(job, data, out: Path) -> list[list[dict]]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from fjordtune.data.prepare import prepare_datasets, shard_config

    def shard_worker(config: dict) -> None:  # nested: pickled by value, since workers cannot import tests/
        import ray.train

        from fjordtune.data.prepare import read_shard_rows

        rank = ray.train.get_context().get_world_rank()
        Path(config["out"], f"rank{rank}.json").write_text(json.dumps(
            [{"row_id": int(r["row_id"]), "ids": [int(i) for i in r["input_ids"]],
              "labels": [int(x) for x in r["labels"]]} for r in read_shard_rows("train")]))

    prepared = prepare_datasets(job, data, model_uri=job.model.tokenizer or "", say=lambda line: None)
    out.mkdir()
    TorchTrainer(shard_worker, train_loop_config={"out": str(out)}, datasets=prepared.datasets,
                 dataset_config=shard_config(prepared.datasets, job.resources.num_workers),
                 torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=job.resources.num_workers),
                 run_config=RunConfig(name=out.name, storage_path=str(out.parent / "ray-train"))).fit()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(job.resources.num_workers)]


def test_each_worker_reads_its_own_shard_the_same_on_every_run(local_ray, tmp_path: Path) -> None:
    """Three workers get disjoint shards (sizes within one row) that together hold every training row once;
    a second run of the same job cuts them identically (a resume sees the same shard); the token ids and
    loss mask equal the single-process tokenization of the same rows (labels on assistant tokens only)."""
    from fjordtune.config import load_job
    from fjordtune.data.prepare import plan_job_data
    from fjordtune.data.sft import fit_one, read_rows, tokenize_row
    from fjordtune.model.load import load_tokenizer
    from fjordtune.storage import Store

    job = load_job(DEMO, [f"storage.uri={tmp_path / 'store'}", "resources.num_workers=3", "model.tokenizer=builtin:demo",
                          "data.eval_files=[]", "data.eval_fraction=0.1", "data.max_seq_len=64"])
    data = plan_job_data(job, store=Store.for_job(job), say=lambda line: None)
    first = _run_shards(job, data, tmp_path / "a")
    second = _run_shards(job, data, tmp_path / "b")
    assert first == second
    ids = [[r["row_id"] for r in shard] for shard in first]
    flat = [i for shard in ids for i in shard]
    held = set(int(i) for i in data.plan.held_out)
    rows = read_rows([str(SFT)])
    assert len(flat) == len(set(flat)) == len(rows) - len(held) and not set(flat) & held
    assert max(map(len, ids)) - min(map(len, ids)) <= 1
    assert all(sorted(shard) != shard for shard in ids)  # shuffled, not in file order
    tok = load_tokenizer("builtin:demo")
    for shard in first:
        for r in shard:
            ex, _ = fit_one(tokenize_row(rows[r["row_id"]], tok, max_seq_len=None), max_seq_len=64,
                            truncation="truncate")
            assert (r["ids"], r["labels"]) == (ex.input_ids, ex.labels)


def test_shards_of_different_sizes_take_the_same_steps_and_held_out_batches() -> None:
    """Workers with shards of their own: every rank takes as many steps per epoch as the smallest shard fills
    and as many held-out batches as the largest held-out shard needs (collectives stay in step)."""
    from types import SimpleNamespace

    from fjordtune.config import load_job
    from fjordtune.data.sft import Example, LengthReport
    from fjordtune.train.loop import prepare_shard

    job = load_job(DEMO, ["storage.uri=/tmp/unused", "train.micro_batch_size=2", "train.grad_accum_steps=2",
                          "data.packing=false", "train.epochs=3"])
    core = SimpleNamespace(job=job)
    lengths = LengthReport(rows=0, too_long=0, longest=0, kept=0, dropped=0, label_free=0, tokens_cut=0,
                           max_seq_len=256, policy="truncate")

    def examples(n: int) -> list[Example]:
        return [Example([1, 2, 3 + i], [-100, 2, 3 + i]) for i in range(n)]

    shards = [(examples(13), examples(3)), (examples(9), examples(5))]
    alone = [prepare_shard(core, t, h, lengths=lengths, world=2, gather=lambda x: [x]) for t, h in shards]
    assert [d.per_epoch for d in alone] == [13 // 4, 9 // 4]  # what each would take by itself
    everyone = _as_two_ranks(lambda rank, gather: prepare_shard(core, *shards[rank], lengths=lengths, world=2,
                                                                 gather=gather))
    assert [d.per_epoch for d in everyone] == [2, 2] and [d.total_steps for d in everyone] == [6, 6]
    assert [d.eval_batches for d in everyone] == [3, 3]  # ceil(5 / 2) for both
    assert all(d.local for d in everyone)


def _as_two_ranks(fn) -> list:
    """`fn(rank, gather)` on two threads, `gather` an all-gather between them (each call returns both
    values in rank order), like `checkpointing.gather_objects` across two processes."""
    import threading

    slots: list = [None, None]
    barrier = threading.Barrier(2)
    results: list = [None, None]

    def gather_for(rank: int):
        def gather(value):
            slots[rank] = value
            barrier.wait()
            both = list(slots)
            barrier.wait()  # nobody overwrites a slot before both have read them
            return both
        return gather

    def run(rank: int) -> None:
        results[rank] = fn(rank, gather_for(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results
