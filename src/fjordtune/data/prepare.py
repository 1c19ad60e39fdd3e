"""A job's training data, from the sources to each training worker's shard.

On the driver, before any worker starts: one streaming pass over every source plans the mixture (dedup,
filters, sampling: `data.mixture`) and, in the same pass, checks every row against every NorEval item
(`data.contamination`). The driver keeps a few dozen bytes per row, never the rows themselves; a
contaminated row stops the job here, naming file and line, unless `data.allow_contamination`.

Then Ray Data reads the planned rows where they are (one ranged read per chunk of a file or object),
tokenizes them with the model's chat template and fits them to `data.max_seq_len` on the cluster's CPUs,
and keeps the result in the object store. Each training worker gets its own shard through Ray Train's
`get_dataset_shard`: `ShardByOrder` cuts the rows, sorted by a seeded pseudo-random key, into one
contiguous range per rank. The cut is the same on every run of the same job, so a resumed run sees the
same shard in the same order as the run it resumes.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fjordtune.config.schema import JobSpec
from fjordtune.errors import UserError

if TYPE_CHECKING:
    from fjordtune.data.contamination import CheckResult, EvalIndex
    from fjordtune.data.mixture import Plan
    from fjordtune.data.sft import LengthReport

log = logging.getLogger(__name__)

CHUNK_ROWS = 2000
"""Rows per Ray Data read task: one ranged read each, and enough rows that the task's overhead is small."""

FIRST_HITS = 5
"""Hits named in the refusal (and in the log); `fjordtune contamination` lists them all."""


class ContaminatedData(UserError):
    """Training rows contain NorEval items and `data.allow_contamination` is false."""


@dataclass
class JobData:
    """The planned mixture (and held-out files) of a job, with the contamination check's result."""

    plan: Plan
    eval_plan: Plan | None
    check: CheckResult | None  # None: not run (no NorEval data reachable, and allowed)
    check_note: str = ""
    seconds: float = 0.0
    lines: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """What run.json, summary.json and the report keep: the manifest and the check's outcome."""
        return {"manifest": self.plan.manifest, "contamination": contamination_summary(self.check, self.check_note)}


def contamination_summary(check: CheckResult | None, note: str = "") -> dict[str, Any]:
    if check is None:
        return {"checked": False, "note": note}
    rows = sorted(check.contaminated_rows)
    return {"checked": True, "train_rows": check.train_rows, "eval_items": check.eval_items,
            "hits": len(check.hits), "contaminated_rows": len(rows), "seconds": round(check.seconds, 2),
            "first_hits": [h.to_dict() for h in check.hits[:FIRST_HITS]], "note": note}


def eval_index(job: JobSpec) -> EvalIndex:
    """Every NorEval item the job can see (`eval.data_dir`, else the hub), indexed for the check."""
    from fjordtune.data.contamination import EvalIndex, eval_texts_from_dir, eval_texts_from_hub

    c = job.data.contamination
    if job.eval.data_dir:
        index = EvalIndex(eval_texts_from_dir(job.eval.data_dir), ngram=c.ngram, min_words=c.min_words)
        if not index.num_items:
            raise UserError(f"eval.data_dir: {job.eval.data_dir}: no NorEval files "
                            "(<data_dir>/ltg/<dataset>/<nb|nn>/<split>.jsonl) to check the training data against")
        return index
    return EvalIndex(eval_texts_from_hub(), ngram=c.ngram, min_words=c.min_words)


def hit_line(h: Any) -> str:
    return (f"{h.train_file}:{h.train_line}: contains {h.eval_dataset} {h.eval_config}/{h.eval_split} item "
            f"{h.eval_id} ({h.field}, {h.kind} match): \"{h.span[:80]}\"")


def plan_job_data(job: JobSpec, *, store: Any, say: Callable[[str], None] = print) -> JobData:
    """Plan the job's mixture and check every source row for NorEval items, in one pass over the sources.
    Raises `ContaminatedData` (naming the first hits) unless `data.allow_contamination`."""
    from fjordtune.data.contamination import CheckResult, row_texts
    from fjordtune.data.mixture import manifest_lines, plan_files, plan_mixture

    t0 = time.perf_counter()
    d = job.data
    note = ""
    try:
        index = eval_index(job)
    except UserError as e:
        if not d.allow_contamination:
            raise UserError(f"the contamination check cannot run: {e.lines[0]}",
                            "give eval.data_dir, or set data.allow_contamination: true to train unchecked") from None
        index, note = None, f"not checked: {e.lines[0]}"
        say(f"data: contamination {note} (data.allow_contamination: true)")
    hits: list[Any] = []
    rows = 0

    def on_row(row: Any) -> None:
        nonlocal rows
        rows += 1
        hits.extend(index.check(row.file, row.line, row_texts(row.row)))

    c0 = time.perf_counter()
    plan = plan_mixture(d, store=store, on_row=on_row if index is not None else None, progress=say)
    eval_plan = plan_files(d.eval_files, key="data.eval_files", store=store, on_bad_row=d.on_bad_row) \
        if d.eval_files else None
    check = CheckResult(hits, rows, index.num_items, time.perf_counter() - c0) if index is not None else None
    lines = [f"data: {line}" for line in manifest_lines(plan.manifest)]
    for line in lines:
        say(line)
    if check is not None:
        bad = sorted(check.contaminated_rows)
        if not check.hits:
            say(f"data: contamination check: {rows} rows against {check.eval_items} NorEval items "
                f"(substring and {d.contamination.ngram}-gram): clean")
        else:
            first = [hit_line(h) for h in check.hits[:FIRST_HITS]]
            more = f" (and {len(check.hits) - FIRST_HITS} more hits)" if len(check.hits) > FIRST_HITS else ""
            head = (f"{len(bad)} of {rows} training rows contain NorEval test items ({len(check.hits)} hits){more}")
            if not d.allow_contamination:
                raise ContaminatedData(
                    f"refusing to train: {head}", *first,
                    "list them all: fjordtune contamination JOB; write cleaned files: fjordtune contamination JOB "
                    "--remove OUT; or set data.allow_contamination: true to train on them anyway")
            note = "trained anyway (data.allow_contamination: true)"
            say(f"data: warning: {head}; training anyway (data.allow_contamination: true)")
            for line in first:
                say(f"  {line}")
    return JobData(plan, eval_plan, check, note, time.perf_counter() - t0, lines)


def save_data_record(job: JobSpec, data: JobData, *, store: Any) -> str:
    """Commit the manifest and the check's result to `<run>/data/` (what the run trained on, for the record)."""
    uri = f"{job.run_uri}/data"
    with tempfile.TemporaryDirectory(prefix="fjordtune-data-") as tmp:
        Path(tmp, "manifest.json").write_text(json.dumps(data.plan.manifest, indent=2) + "\n")
        check = {"summary": contamination_summary(data.check, data.check_note),
                 "hits": [h.to_dict() for h in data.check.hits] if data.check else []}
        Path(tmp, "contamination.json").write_text(json.dumps(check, indent=2) + "\n")
        store.upload_dir(tmp, uri)
    return uri


# -- Ray Data ----------------------------------------------------------------------------------------

def order_key(row_id: int, seed: int) -> int:
    """A seeded pseudo-random 63-bit key per row (splitmix64): sorting by it shuffles the rows the same way on
    every run without anyone holding the permutation."""
    z = (row_id + 0x9E3779B97F4A7C15 * (seed + 1)) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1


class Tokenize:
    """A Ray Data actor: reads planned chunks and turns their rows into fitted token ids and labels. Loads the
    tokenizer once (the model folder's, without its weights) and keeps one store client."""

    def __init__(self, job: dict[str, Any], model_uri: str, driver_cwd: str = "") -> None:
        import os

        from fjordtune.config.load import validate_raw
        from fjordtune.model.load import load_tokenizer, local_tokenizer_dir
        from fjordtune.storage import Store

        if driver_cwd and os.getcwd() != driver_cwd and os.path.isdir(driver_cwd):
            # a local cluster started elsewhere: the job's relative paths mean the driver's folder (under
            # `ray job submit` every node unpacks the working dir and starts its workers in it)
            os.chdir(driver_cwd)
        self.job = validate_raw(job, source="<ray data>")
        self.store = Store.for_job(self.job)
        self._tmp = tempfile.TemporaryDirectory(prefix="fjordtune-tokenizer-")
        where = self.job.model.tokenizer or local_tokenizer_dir(model_uri, store=self.store, dest=self._tmp.name)
        self.tokenizer = load_tokenizer(where)

    def __call__(self, batch: dict[str, Any]) -> Any:
        import numpy as np
        import pyarrow as pa

        from fjordtune.data.sft import fit_one, tokenize_row
        from fjordtune.data.sources import read_chunk

        d = self.job.data
        cols: dict[str, list[Any]] = {k: [] for k in (
            "row_id", "order", "held_out", "input_ids", "labels", "kept", "num_tokens", "too_long", "tokens_cut",
            "too_long_tokens", "label_free", "file", "line")}
        for chunk_json, offset, all_held in zip(batch["chunk"], batch["offset"], batch["all_held"], strict=True):
            chunk = json.loads(chunk_json)
            held_ids = set(chunk.get("held", ()))
            for row_id, row in read_chunk(chunk, store=self.store):
                held = bool(all_held) or row_id in held_ids
                ex = tokenize_row(row.row, self.tokenizer, max_seq_len=None, chat_template=d.chat_template)
                n = len(ex.input_ids)
                # held-out rows are always cut, never dropped, and count in no training figure
                fitted, cut = fit_one(ex, max_seq_len=d.max_seq_len, truncation="truncate" if held else d.truncation)
                rid = int(row_id) + int(offset)
                cols["row_id"].append(rid)
                cols["order"].append(order_key(rid, d.shuffle_seed))
                cols["held_out"].append(bool(held))
                cols["input_ids"].append(fitted.input_ids if fitted else [])
                cols["labels"].append(fitted.labels if fitted else [])
                cols["kept"].append(fitted is not None)
                cols["num_tokens"].append(0 if held else n)
                cols["too_long"].append(int(not held and n > d.max_seq_len))
                cols["too_long_tokens"].append(n if not held and n > d.max_seq_len else 0)
                cols["tokens_cut"].append(0 if held else cut)
                cols["label_free"].append(int(not held and fitted is None
                                              and (n <= d.max_seq_len or d.truncation == "truncate")))
                cols["file"].append(row.file)
                cols["line"].append(int(row.line))
        return pa.table({
            **{k: pa.array(cols[k], type=pa.int64()) for k in (
                "row_id", "num_tokens", "tokens_cut", "too_long_tokens", "too_long", "label_free", "line")},
            "order": pa.array(np.array(cols["order"], dtype=np.int64)),
            **{k: pa.array(cols[k], type=pa.bool_()) for k in ("held_out", "kept")},
            **{k: pa.array(cols[k], type=pa.list_(pa.int32())) for k in ("input_ids", "labels")},
            "file": pa.array(cols["file"], type=pa.string()),
        })


_SUMMED = ("too_long", "label_free", "tokens_cut", "num_tokens", "too_long_tokens")


def _length_sums(tokens: Any) -> dict[str, int]:
    """The length report's figures over the training rows: one small row of sums per block, added up here.
    (Ray Data's `aggregate` runs a hash shuffle on an actor pool: seconds of start-up for a few integers.)"""
    import numpy as np

    def sums(batch: dict[str, Any]) -> dict[str, Any]:
        train = ~np.asarray(batch["held_out"], dtype=bool)
        out = {k: [int(np.asarray(batch[k])[train].sum())] for k in _SUMMED}
        out["rows"] = [int(train.sum())]
        out["longest"] = [int(np.asarray(batch["num_tokens"]).max(initial=0))]
        return out

    parts = tokens.select_columns(["held_out", *_SUMMED]).map_batches(sums, batch_size=None).take_all()
    total = {k: sum(int(p[k]) for p in parts) for k in (*_SUMMED, "rows")}
    total["longest"] = max((int(p["longest"]) for p in parts), default=0)
    return total


@dataclass
class PreparedData:
    """The tokenized, fitted rows in Ray's object store, ready for `TorchTrainer(datasets=...)`."""

    datasets: dict[str, Any]
    lengths: LengthReport
    num_train: int
    num_eval: int
    seconds: float


def shard_bounds(n: int, world: int) -> list[int]:
    """Where rank r's contiguous range of n sorted rows starts, r = 1..world-1 (sizes differ by at most one)."""
    return [n * r // world for r in range(1, world)]


def prepare_datasets(job: JobSpec, data: JobData, *, model_uri: str,
                     say: Callable[[str], None] = print) -> PreparedData:
    """Tokenize and fit the planned rows on Ray Data (the driver only lists chunks); materialize the training
    and held-out rows, sorted by their shuffle key, in the object store."""
    import os

    import ray.data

    from fjordtune.config.load import dump_job
    from fjordtune.data.sft import LengthReport

    t0 = time.perf_counter()
    chunks = [{"chunk": json.dumps(c), "offset": 0, "all_held": False} for c in data.plan.chunks(CHUNK_ROWS)]
    if data.eval_plan is not None:  # data.eval_files: held out whole, row ids after the training rows'
        chunks += [{"chunk": json.dumps(c), "offset": data.plan.num_rows, "all_held": True}
                   for c in data.eval_plan.chunks(CHUNK_ROWS)]
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    tokens = ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(
        Tokenize, fn_constructor_kwargs={"job": dump_job(job), "model_uri": model_uri, "driver_cwd": os.getcwd()},
        batch_size=1, concurrency=(1, max(1, min(len(chunks), cpus, 16))), num_cpus=1,
    ).materialize()
    d = job.data
    agg = _length_sums(tokens)
    train = tokens.filter(lambda r: r["kept"] and not r["held_out"]).sort("order").materialize()
    held = None
    if len(data.plan.held_out) or data.eval_plan is not None:  # no sort (seconds of tasks) for nothing
        held = tokens.filter(lambda r: r["kept"] and r["held_out"]).sort("order").materialize()
    num_train, num_eval = train.count(), held.count() if held is not None else 0
    rows = agg["rows"]
    lengths = LengthReport(
        rows=rows, too_long=agg["too_long"], longest=agg["longest"], kept=num_train, dropped=rows - num_train,
        label_free=agg["label_free"], tokens_cut=agg["tokens_cut"], max_seq_len=d.max_seq_len, policy=d.truncation,
        num_tokens=agg["num_tokens"], too_long_tokens=agg["too_long_tokens"])
    if not num_train:
        raise UserError(f"no training rows left: of {rows} rows, {lengths.too_long} are longer than "
                        f"data.max_seq_len={d.max_seq_len} and {lengths.label_free} have no assistant token within "
                        f"it (data.truncation={d.truncation}); raise data.max_seq_len")
    seconds = time.perf_counter() - t0
    say(f"data: tokenized {rows + num_eval} rows in {len(chunks)} Ray Data tasks in {seconds:.1f} s: {num_train} "
        f"training rows{f' and {num_eval} held-out' if num_eval else ''} in the object store")
    datasets = {"train": train}
    if num_eval:
        datasets["eval"] = held
    return PreparedData(datasets, lengths, num_train, num_eval, seconds)


def shard_config(datasets: dict[str, Any], world: int) -> Any:
    """Ray Train's DataConfig that hands rank r the r-th contiguous range of each (sorted, materialized)
    dataset: deterministic, unlike `streaming_split`, which deals blocks to whichever worker asks first.
    The ranges are cut here, on the driver, while the cluster's CPUs are free: cutting a block takes a Ray
    task, and inside `configure` (called once the workers hold their CPUs) it could wait forever for one."""
    from ray.train import DataConfig

    parts = {name: ds.split_at_indices(shard_bounds(ds.count(), world)) for name, ds in datasets.items()}

    class ShardByOrder(DataConfig):
        def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Any, worker_node_ids: Any,
                      **kwargs: Any) -> list[dict[str, Any]]:
            if world_size != world:
                raise RuntimeError(f"shards were cut for {world} workers, not {world_size}")
            return [{name: parts[name][rank].iterator() for name in datasets} for rank in range(world_size)]

    return ShardByOrder()


def read_shard_rows(name: str) -> list[dict[str, Any]]:
    """This worker's rows of dataset `name` (from `ray.train.get_dataset_shard`), in shuffle-key order."""
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    if shard is None:
        return []
    return sorted(shard.iter_rows(), key=lambda r: int(r["order"]))


def read_shard(name: str) -> list[Any]:
    """This worker's rows of dataset `name` as `Example`s, in shuffle-key order."""
    from fjordtune.data.sft import Example

    return [Example([int(i) for i in r["input_ids"]], [int(x) for x in r["labels"]]) for r in read_shard_rows(name)]
