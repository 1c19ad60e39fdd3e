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
from pathlib import Path
from typing import Any

from fjordtune.config.schema import JobSpec
from fjordtune.errors import UserError

log = logging.getLogger(__name__)

_TASK_MANAGER: Any = None


def task_manager() -> Any:
    """One lm-eval TaskManager per process: indexing ~14,700 tasks takes 7-18 s."""
    global _TASK_MANAGER
    if _TASK_MANAGER is None:
        import lm_eval.models  # noqa: F401  (registers the built-in models before any of ours)
        from lm_eval.tasks import TaskManager

        _TASK_MANAGER = TaskManager()
    return _TASK_MANAGER


def expand_tasks(patterns: list[str], *, known: list[str]) -> list[str]:
    """Expand shell-style patterns against the registered task names, keeping order and uniqueness."""
    out: list[str] = []
    for pat in patterns:
        hits = fnmatch.filter(known, pat) if any(c in pat for c in "*?[") else ([pat] if pat in known else [])
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


def build_tasks(job: JobSpec) -> tuple[list[str], Any]:
    tm = task_manager()
    names = expand_tasks(job.eval.tasks, known=list(tm.all_tasks))
    if job.eval.data_dir:
        from fjordtune.eval.noreval import build_task_dict

        task_dict = build_task_dict(names, job.eval.data_dir, num_fewshot=job.eval.num_fewshot, task_manager=tm)
    else:
        from fjordtune.eval.noreval import apply_fewshot

        task_dict = tm.load(names)
        apply_fewshot(leaf_tasks(task_dict), job.eval.num_fewshot)
    return names, task_dict


def evaluate(job: JobSpec, *, model_uri: str, adapter_uri: str | None, label: str,
             output_dir: str | Path | None = None) -> dict[str, Any]:
    """Score `job.eval.tasks` on the model at `model_uri` (+ adapter) and return the results dict."""
    import lm_eval.evaluator

    from fjordtune.eval.noreval import chance_level
    from fjordtune.eval.ray_lm import RayDataLM
    from fjordtune.model.load import load_tokenizer, local_tokenizer_dir
    from fjordtune.storage import Store

    store = Store.for_job(job)
    # the driver only tokenizes: the scoring actors fetch the weights
    with tempfile.TemporaryDirectory(prefix="fjordtune-tok-") as tmp:
        tokenizer = load_tokenizer(job.model.tokenizer or local_tokenizer_dir(model_uri, store=store, dest=tmp))
    names, task_dict = build_tasks(job)
    if job.eval.limit:
        log.warning("eval.limit=%d: scoring a subsample; full evaluation is the default for a reason", job.eval.limit)
    lm = RayDataLM(
        model_uri=model_uri, adapter_uri=adapter_uri, tokenizer=tokenizer, dtype=job.model.dtype,
        num_workers=job.eval.num_workers, batch_size=job.eval.batch_size, use_gpu=job.resources.use_gpu,
        cpus_per_worker=job.resources.cpus_per_worker, storage=store.settings(), name=label,
        cache_dir=job.storage.cache_dir,
        gpus_per_worker=job.eval.gpus_per_worker,
    )
    t0 = time.perf_counter()
    raw = lm_eval.evaluator.evaluate(
        lm=lm, task_dict=task_dict, limit=job.eval.limit, apply_chat_template=job.eval.apply_chat_template,
        bootstrap_iters=1000, log_samples=False, verbosity="WARNING",
    )
    seconds = time.perf_counter() - t0
    results = summarize(raw, leaf_tasks(task_dict), chance_fn=chance_level)
    results.update(model=label, model_uri=model_uri, adapter_uri=adapter_uri, num_requests=lm.num_scored,
                   seconds=round(seconds, 2), num_fewshot=job.eval.num_fewshot,
                   apply_chat_template=job.eval.apply_chat_template)
    for w in results["warnings"]:
        log.warning("%s: %s", label, w)
    if output_dir:
        write_results(results, output_dir)
    return results


def summarize(raw: dict[str, Any], tasks: dict[str, Any], *, chance_fn: Any) -> dict[str, Any]:
    """Per-task acc / acc_norm / n / chance from lm-eval's output, with sanity warnings."""
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
        out["tasks"][name] = entry
        if "acc" in entry and entry["chance"] is not None and entry["n"] >= 20 and entry["acc"] <= entry["chance"]:
            out["warnings"].append(
                f"{name}: acc {entry['acc']:.3f} is at or below chance ({entry['chance']:.3f}) over "
                f"{entry['n']} items: check weight loading, prompt format and chat template"
            )
    return out


def write_results(results: dict[str, Any], output_dir: str | Path) -> Path:
    path = Path(output_dir) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return path
