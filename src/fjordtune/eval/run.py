"""Evaluate a base model (optionally with a LoRA adapter) on lm-eval tasks through Ray Data.

Writes `results.json`: `{"model": ..., "tasks": {<lm-eval task>: {"acc", "acc_norm"?, "n", "chance",
"acc_stderr"?}}, "warnings": [...]}`. Every task gets a chance-level sanity check: a model at or
below chance is flagged, because that is what silently ignored weights look like.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fjordtune.config.schema import JobSpec
from fjordtune.errors import UserError

log = logging.getLogger(__name__)

_TASK_MANAGERS: dict[str, Any] = {}


def task_manager(patterns: list[str] | None = None) -> Any:
    """An lm-eval TaskManager, one per process and scope.

    lm-eval's CLI indexes every task it ships (~14,700 YAML files: 7-18 s on this machine). When every
    name or pattern in `patterns` resolves among NorEval's own 116 tasks, an index of lm-eval's `noreval`
    folder alone is returned (0.1 s; the same YAML files, so the same tasks); anything else (another
    benchmark, a typo to suggest a correction for, `patterns` None) gets the full index."""
    import lm_eval.models  # noqa: F401  (registers the built-in models before any of ours)

    if patterns and "noreval" not in _TASK_MANAGERS:
        _TASK_MANAGERS["noreval"] = _new_task_manager(noreval_only=True)
    if patterns and _resolves(patterns, _TASK_MANAGERS["noreval"]):
        return _TASK_MANAGERS["noreval"]
    if "all" not in _TASK_MANAGERS:
        _TASK_MANAGERS["all"] = _new_task_manager(noreval_only=False)
    return _TASK_MANAGERS["all"]


def _new_task_manager(*, noreval_only: bool) -> Any:
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    cache_prompt_templates()
    if not noreval_only:
        return TaskManager()
    folder = Path(lm_eval.tasks.__file__).parent / "noreval"
    if not folder.is_dir():  # a future lm-eval that moved it: the full index still works
        return TaskManager()
    return TaskManager(include_path=str(folder), include_defaults=False)


def _resolves(patterns: list[str], tm: Any) -> bool:
    try:
        expand_tasks(patterns, known=list(tm.all_tasks), leaves=list(tm.all_subtasks))
    except UserError:
        return False
    return True


def cache_prompt_templates() -> bool:
    """Compile each of lm-eval's Jinja prompt templates once per process instead of once per use.

    lm-eval 0.4.13 renders every document's prompt, target and choices through `utils.apply_template`,
    which calls `env.from_string(template)`: a fresh parse and compile each time. Measured on 3,520
    NorEval documents (14,475 requests) with a scorer that costs nothing, that was 21 of lm-eval's 32.5 s.
    A compiled template is a pure function of its source text, so the prompts are identical (the
    equivalence tests compare them with the `hf` backend's character for character). Returns False when
    lm-eval no longer has the module-level environment this relies on (then nothing is changed).
    """
    import lm_eval.utils

    env = getattr(lm_eval.utils, "env", None)
    if env is None or not callable(getattr(env, "from_string", None)):
        return False
    if getattr(env, "_fjordtune_cached", False):
        return True
    compile_template = env.from_string
    compiled: dict[str, Any] = {}

    def from_string(source: Any, globals: Any = None, template_class: Any = None) -> Any:  # noqa: A002
        if globals is not None or template_class is not None or not isinstance(source, str):
            return compile_template(source, globals, template_class)
        found = compiled.get(source)
        if found is None:
            found = compiled[source] = compile_template(source)
        return found

    env.from_string = from_string
    env._fjordtune_cached = True
    return True


def expand_tasks(patterns: list[str], *, known: list[str], leaves: list[str] | None = None) -> list[str]:
    """Expand shell-style patterns against the registered task names, keeping order and uniqueness.

    With `leaves` (lm-eval's `all_subtasks`), a pattern expands to tasks only: `nrk_quiz_qa_*` means the
    ten prompt tasks, not also the tags `nrk_quiz_qa_nob`/`_nno` that group them. A name given in full may
    still be a group or a tag."""
    out: list[str] = []
    leaf_set = set(leaves) if leaves is not None else None
    for pat in patterns:
        if any(c in pat for c in "*?["):
            hits = [h for h in fnmatch.filter(known, pat) if leaf_set is None or h in leaf_set]
        else:
            hits = [pat] if pat in known else []
        if not hits:
            import difflib

            close = difflib.get_close_matches(pat, known, n=3)
            raise UserError(f"eval.tasks: {pat!r} matches no lm-eval task" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        out.extend(h for h in sorted(hits) if h not in out)
    return out


def leaf_tasks(task_dict: Any) -> dict[str, Any]:
    """{task name: Task} from either shape lm-eval uses for a task dict."""
    if isinstance(task_dict, dict) and isinstance(task_dict.get("tasks"), dict):
        return dict(task_dict["tasks"])
    out = {}
    for key, value in task_dict.items():
        if isinstance(value, dict):
            out.update(leaf_tasks(value))
        else:
            out[getattr(key, "task_name", key) if not isinstance(key, str) else key] = value
    return out


def check_tasks(job: JobSpec) -> list[str]:
    """The job's task names, `eval.tasks` and `eval.num_fewshot` patterns checked against lm-eval's
    registry: `run` calls this before training, so a typo fails in seconds, not after hours of GPU time."""
    from fjordtune.eval.noreval import fewshot_counts

    tm = task_manager(job.eval.tasks)
    names = expand_tasks(job.eval.tasks, known=list(tm.all_tasks), leaves=list(tm.all_subtasks))
    fewshot_counts(names, job.eval.num_fewshot)
    return names


def build_tasks(job: JobSpec) -> tuple[list[str], Any]:
    """The job's tasks, built as lm-eval's `simple_evaluate` builds them (few-shot counts, seed), with
    NorEval's scored questions kept out of their own few-shot examples. Returns (names, task dict)."""
    from fjordtune.eval.noreval import DEFAULT_FEWSHOT_SEED, apply_fewshot, build_task_dict, load_registered

    tm = task_manager(job.eval.tasks)
    names = expand_tasks(job.eval.tasks, known=list(tm.all_tasks), leaves=list(tm.all_subtasks))
    if job.eval.data_dir:
        task_dict = build_task_dict(names, job.eval.data_dir, num_fewshot=job.eval.num_fewshot, task_manager=tm,
                                    fewshot_seed=DEFAULT_FEWSHOT_SEED)
    else:
        task_dict = load_registered(names, tm)
        apply_fewshot(leaf_tasks(task_dict), job.eval.num_fewshot, seed=DEFAULT_FEWSHOT_SEED)
    return names, task_dict


def prompt_kwargs(job: JobSpec) -> dict[str, Any]:
    """How lm-eval's `evaluate` builds the prompts for this job: the arguments lm-eval's CLI passes
    for `--apply_chat_template`, `--system_instruction` and `--fewshot_as_multiturn`."""
    return {"apply_chat_template": job.eval.apply_chat_template, "system_instruction": job.eval.system_instruction,
            "fewshot_as_multiturn": job.eval.effective_fewshot_as_multiturn}


def protocol_of(task_dict: Any, job: JobSpec, *, chat_template: str | None = None) -> dict[str, Any]:
    """What decides the prompts and shots of a run, for results.json: per task the few-shot count used,
    the split the shots come from, whether the scored document is kept out of its own shots, and the
    sampler's seed (the last three None at 0-shot); globally the prompt arguments given to lm-eval,
    the SHA-256 of the chat template text (`chat_template`) and lm-eval's version."""
    from importlib.metadata import version

    from fjordtune.eval.chat import template_sha256
    from fjordtune.eval.noreval import DEFAULT_FEWSHOT_SEED, excludes_scored_doc, fewshot_source

    tasks = {}
    for name, task in sorted(leaf_tasks(task_dict).items()):
        shots = int(task.get_config("num_fewshot") or 0)
        has_cfg = hasattr(task, "fewshot_cfg")  # a ConfigurableTask: every YAML task
        tasks[name] = {
            "num_fewshot": shots,
            "fewshot_split": fewshot_source(task) if shots and has_cfg else None,
            "excludes_scored_doc": excludes_scored_doc(task) if shots and has_cfg else None,
            "fewshot_seed": DEFAULT_FEWSHOT_SEED if shots else None,
        }
    apply = job.eval.apply_chat_template
    return {
        **prompt_kwargs(job),
        "chat_template_args": dict(job.eval.chat_template_args) if apply else {},
        "chat_template_sha256": template_sha256(chat_template) if apply else None,
        "lm_eval_version": version("lm_eval"),
        "tasks": tasks,
    }


@dataclass
class Prepared:
    """What an evaluation needs before any Ray work: the tokenizer, the model's config and lm-eval's tasks."""

    tokenizer: Any
    config: Any
    names: list[str]
    task_dict: Any


def prepare(job: JobSpec, *, model_uri: str) -> Prepared:
    """The tokenizer and config (only their files are fetched: the scoring actors fetch the weights) and
    the job's lm-eval tasks. Needs no Ray: `pipeline.evaluate` runs it while Ray starts."""
    from transformers import AutoConfig

    from fjordtune.model.load import load_tokenizer, local_tokenizer_dir
    from fjordtune.storage import Store

    store = Store.for_job(job)
    with tempfile.TemporaryDirectory(prefix="fjordtune-tok-") as tmp:
        meta_dir = local_tokenizer_dir(model_uri, store=store, dest=tmp)
        tokenizer = load_tokenizer(job.model.tokenizer or meta_dir)
        config = AutoConfig.from_pretrained(meta_dir)
    names, task_dict = build_tasks(job)
    return Prepared(tokenizer, config, names, task_dict)


def evaluate(job: JobSpec, *, model_uri: str, adapter_uri: str | None, label: str,
             output_dir: str | Path | None = None, prepared: Prepared | None = None) -> dict[str, Any]:
    """Score `job.eval.tasks` on the model at `model_uri` (+ adapter) and return the results dict.
    `prepared`: `prepare(job, model_uri=model_uri)` done already."""
    import lm_eval.evaluator

    from fjordtune.eval.noreval import chance_from_samples
    from fjordtune.eval.ray_lm import RayDataLM
    from fjordtune.eval.tp import replica_placement
    from fjordtune.preflight.gate import plan_eval
    from fjordtune.storage import Store

    store = Store.for_job(job)
    prepared = prepared or prepare(job, model_uri=model_uri)
    tokenizer, config, task_dict = prepared.tokenizer, prepared.config, prepared.task_dict
    plan = plan_eval(job)
    placement, ranks = replica_placement(config, gpus=plan.gpus_per_replica, use_gpu=job.resources.use_gpu,
                                         requested=job.eval.placement)
    log.info("%s: %s%s", label, plan.line(), f"; placement {placement.replace('_', ' ')}" if ranks > 1 or
             placement == "device_map" else "")
    if job.eval.limit:
        log.warning("eval.limit=%d: scoring a subsample; full evaluation is the default for a reason", job.eval.limit)
    lm = RayDataLM(
        model_uri=model_uri, adapter_uri=adapter_uri, tokenizer=tokenizer, dtype=job.model.dtype,
        num_workers=plan.replicas, batch_size=job.eval.batch_size, use_gpu=job.resources.use_gpu,
        cpus_per_worker=job.resources.cpus_per_worker, storage=store.settings(), name=label,
        cache_dir=job.storage.cache_dir,
        gpus_per_worker=max(1, plan.gpus_per_replica), fill_cluster=plan.auto_replicas and job.resources.use_gpu,
        chat_template_args=job.eval.chat_template_args,
        results=result_store(job, store, model_uri=model_uri, adapter_uri=adapter_uri, tokenizer=tokenizer),
        max_restarts=job.eval.max_restarts, tensor_parallel=ranks, telemetry=telemetry_settings(job),
    )
    if not job.eval.apply_chat_template and job.eval.chat_template_args:
        log.warning("eval.chat_template_args is ignored: eval.apply_chat_template is false")
    t0 = time.perf_counter()
    per_doc = DocMetrics(leaf_tasks(task_dict))  # per_doc in results.json, without lm-eval's log_samples
    lm.start_early()  # the replicas load the model while lm-eval builds the prompts
    try:
        raw = lm_eval.evaluator.evaluate(
            lm=lm, task_dict=task_dict, limit=job.eval.limit, **prompt_kwargs(job),
            bootstrap_iters=1000, log_samples=False, verbosity="WARNING",
        )
    finally:
        lm.close()
    seconds = time.perf_counter() - t0
    if lm.first_ready_at is not None and lm.asked_at is not None:
        ahead = lm.asked_at - lm.first_ready_at
        log.info("%s: the first scoring replica was ready %.1f s %s lm-eval asked for scores", label, abs(ahead),
                 "before" if ahead >= 0 else "after")
    raw["samples"] = samples = per_doc.samples()
    results = summarize(raw, leaf_tasks(task_dict),
                        chance_fn=lambda task: chance_from_samples(task, samples.get(task.config.task, [])))
    template = lm.chat_template(True) if job.eval.apply_chat_template else None
    results.update(model=label, model_uri=model_uri, adapter_uri=adapter_uri,
                   num_requests=lm.num_scored + lm.num_reused, num_scored=lm.num_scored, num_reused=lm.num_reused,
                   results_uri=lm.results.uri if lm.results else None,
                   tokens_full_scoring=lm.tokens_full, tokens_shared_context=lm.tokens_shared,
                   replicas={"count": lm.num_workers, "gpus_each": plan.gpus_per_replica if job.resources.use_gpu
                             else 0, "placement": placement},
                   seconds=round(seconds, 2), num_fewshot=job.eval.num_fewshot,
                   apply_chat_template=job.eval.apply_chat_template,
                   protocol=protocol_of(task_dict, job, chat_template=template))
    telemetry = lm.telemetry_summary()
    if telemetry:
        from fjordtune.telemetry.summary import log_lines

        results["telemetry"] = telemetry  # per GPU of each replica: utilisation, memory, warnings
        for line in log_lines(telemetry):
            log.info("%s: %s", label, line)
    for w in results["warnings"]:
        log.warning("%s: %s", label, w)
    if output_dir:
        write_results(results, output_dir)
    return results


def telemetry_settings(job: JobSpec) -> dict[str, Any]:
    """What each scoring replica's `Monitor` needs (plain data: it travels to the actors)."""
    from fjordtune.telemetry.monitor import job_id

    t = job.telemetry
    return {"run": job.name, "job": job_id(), "interval_s": t.interval_s, "nvml": t.nvml, "export": t.ray_metrics,
            "idle_warning_s": t.idle_warning_s}


def result_store(job: JobSpec, store: Any, *, model_uri: str, adapter_uri: str | None, tokenizer: Any) -> Any:
    """Where this evaluation's unit results are stored and found again (`eval/units.py`), or None with
    `eval.cache: false` or a model that no commit id or revision pins."""
    from fjordtune.eval.encode import tokenizer_fingerprint
    from fjordtune.eval.units import ResultStore

    if not job.eval.cache:
        return None
    found = ResultStore.for_model(store, job.storage.uri, model_uri=model_uri, adapter_uri=adapter_uri,
                                  dtype=job.model.dtype, tokenizer=tokenizer_fingerprint(tokenizer))
    if found is None:
        log.warning("eval: %s is not pinned to a commit or revision: its results are scored afresh and not stored",
                    adapter_uri or model_uri)
    return found


class DocMetrics:
    """Each document's metrics, recorded from its task's own `process_results` as lm-eval's `evaluate` calls
    it (in document order), in the shape of lm-eval's logged samples as far as fjordtune reads them
    (`doc_id`, `filter`, `arguments`, `metrics` and each metric's value).

    `log_samples=True` gives the same values but also keeps, for every document, the document, every
    response and JSON hashes of both: measured 10 of the 113 s of a full-size NorEval run, and ~2.4 KB per
    document on the driver. A task with several filters (lm-eval calls `process_results` once per filter)
    is not recorded: it gets no per_doc (tests/test_eval_equivalence.py compares with log_samples)."""

    def __init__(self, tasks: dict[str, Any]) -> None:
        self.rows: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        self.filters: dict[str, str] = {}
        for name, task in tasks.items():
            filters = getattr(task, "_filters", None) or []
            if len(filters) != 1:
                continue
            self.filters[name] = getattr(filters[0], "name", "none")
            rows = self.rows[name] = []

            def recorded(doc: Any, results: Any, _process: Any = task.process_results, _rows: list = rows) -> Any:
                metrics = _process(doc, results)
                _rows.append((len(results), metrics))
                return metrics

            task.process_results = recorded

    def samples(self) -> dict[str, list[dict[str, Any]]]:
        return {name: [{"doc_id": i, "filter": self.filters[name], "arguments": [None] * n, "metrics": list(m), **m}
                       for i, (n, m) in enumerate(rows)] for name, rows in self.rows.items()}


def summarize(raw: dict[str, Any], tasks: dict[str, Any], *, chance_fn: Any) -> dict[str, Any]:
    """Per-task acc / acc_norm (+ lm-eval's stderr) / n / chance from lm-eval's output, with sanity warnings.
    With per-document samples (`DocMetrics.samples()`, or lm-eval's own with `log_samples=True`), each entry
    also gets `per_doc`: `{"doc_id": [...], "acc": [...], "acc_norm": [...]}` sorted by doc_id, 0/1 per
    scored document, for paired standard errors."""
    out: dict[str, Any] = {"tasks": {}, "warnings": []}
    for name in sorted(tasks):
        res = raw["results"].get(name, {})
        entry: dict[str, Any] = {}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in res:
                entry[metric] = float(res[f"{metric},none"])
                stderr = res.get(f"{metric}_stderr,none")
                if isinstance(stderr, (int, float)):
                    entry[f"{metric}_stderr"] = float(stderr)
        entry["n"] = int(raw.get("n-samples", {}).get(name, {}).get("effective", 0))
        chance = float(chance_fn(tasks[name]))
        entry["chance"] = round(chance, 4) if math.isfinite(chance) else None  # None: not multiple choice
        docs = per_doc_results(raw.get("samples", {}).get(name, []), [m for m in ("acc", "acc_norm") if m in entry])
        if docs:
            entry["per_doc"] = docs
        out["tasks"][name] = entry
        if "acc" in entry and entry["chance"] is not None and entry["n"] >= 20 and entry["acc"] <= entry["chance"]:
            out["warnings"].append(
                f"{name}: acc {entry['acc']:.3f} is at or below chance ({entry['chance']:.3f}) over "
                f"{entry['n']} items: check weight loading, prompt format and chat template"
            )
    return out


def per_doc_results(samples: list[dict[str, Any]], metrics: list[str]) -> dict[str, list[Any]] | None:
    """`{"doc_id": [...], <metric>: [...]}` sorted by doc_id from lm-eval 0.4.13's logged samples (one dict
    per document and filter, holding `doc_id`, `filter` and each metric's value); only the `none` filter,
    whose values are the task's `<metric>,none`. Values 0/1 are stored as ints. None without samples."""
    rows = sorted((s for s in samples if s.get("filter", "none") == "none"), key=lambda s: s["doc_id"])
    if not rows:
        return None
    out: dict[str, list[Any]] = {"doc_id": [int(r["doc_id"]) for r in rows]}
    for metric in metrics:
        if all(isinstance(r.get(metric), (int, float)) for r in rows):
            out[metric] = [int(v) if v in (0, 1) else float(v) for v in (r[metric] for r in rows)]
    return out


def dumps_results(results: dict[str, Any]) -> str:
    """JSON text indented like `json.dumps(indent=2)`, except that a list of numbers or strings stays on one
    line: per_doc over 7,034 documents x 5 prompts is 0.4 MB this way, 1.4 MB with one number per line."""

    def enc(obj: Any, depth: int) -> str:
        pad, end = "  " * (depth + 1), "  " * depth
        if isinstance(obj, dict) and obj:
            items = (f"{pad}{json.dumps(str(k), ensure_ascii=False)}: {enc(v, depth + 1)}" for k, v in obj.items())
            return "{\n" + ",\n".join(items) + f"\n{end}}}"
        if isinstance(obj, (list, tuple)) and any(isinstance(x, (dict, list, tuple)) for x in obj):
            return "[\n" + ",\n".join(f"{pad}{enc(x, depth + 1)}" for x in obj) + f"\n{end}]"
        return json.dumps(obj, ensure_ascii=False)

    return enc(results, 0) + "\n"


def write_results(results: dict[str, Any], output_dir: str | Path) -> Path:
    path = Path(output_dir) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps_results(results))
    return path
