"""The `fjordtune` command: thin wrappers over importable functions.

Exit status: 0 ok, 2 bad input (job file, flags, a job that will not fit), 3 infrastructure
failure (storage, Ray), 4 internal error.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from fjordtune.errors import ConfigError, FjordtuneError

EPILOG = """\
Job files are YAML with the sections model, lora, data, train, eval, storage, resources, telemetry and
submit; `fjordtune validate --explain` lists every key with its meaning and default. Any key can be
overridden with --set section.key=value (the value is parsed as YAML: --set 'eval.tasks=[a, b]').

Exit status: 0 ok; 2 bad input or a job that will not fit; 3 storage or cluster failure; 4 internal error.
"""


def _job_args(p: argparse.ArgumentParser, *, many: bool = False) -> None:
    if many:
        p.add_argument("jobs", nargs="*", metavar="JOB", help="job files (YAML)")
    else:
        p.add_argument("job", metavar="JOB", help="job file (YAML), e.g. jobs/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job-file key, e.g. --set train.lr=1e-4 (repeatable)")


def _cluster_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", metavar="FILE",
                   help="check placement against this cluster's node shapes: a KubeRay RayCluster or RayJob manifest "
                   "or a Ray cluster-launcher YAML (default: nodes of resources.gpus_per_node GPUs)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fjordtune", description="LoRA fine-tuning of large MoE models on Ray (FSDP2) and full NorEval evaluation.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check job files; report every problem at once",
                       description="Load and validate job files. Each problem is one line naming the file, the key "
                       "path and the nearest valid key. Exit 2 if any file is invalid.")
    _job_args(p, many=True)
    p.add_argument("--explain", action="store_true", help="print every job-file key with its type, default and meaning")

    p = sub.add_parser("preflight", help="estimate per-GPU memory before anything is allocated",
                       description="Estimate the per-worker peak memory of the training job (loading and training) and of "
                       "one eval actor, place ranks and actors on nodes, and refuse (exit 2) if it will not fit, "
                       "naming the smallest worker count that would (min_gpus in --json). Needs no GPU and no "
                       "cluster.")
    _job_args(p)
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.add_argument("--method", choices=("analytic", "traced"), default="analytic",
                   help="analytic: formulas of the model's shapes (a second); traced: also run the real setup and "
                   "two training steps at the real world size on fake tensors, with torch's memory trackers, and "
                   "print both (about a minute for the 119B model, no GPU, under 1 GB of memory)")
    _cluster_arg(p)

    p = sub.add_parser("train", help="preflight, then LoRA training on Ray Train with FSDP2",
                       description="Run the preflight check, stage the base model, and train the LoRA adapter on the "
                       "connected Ray cluster (or a local one). Resumes from the latest checkpoint of the same run. "
                       "The adapter is written in peft format to <storage.uri>/<name>/adapter.")
    _job_args(p)
    p.add_argument("--skip-preflight", action="store_true", help="train even if the memory estimate says it will not fit")

    p = sub.add_parser("eval", help="score lm-eval tasks through Ray Data; write DIR/results.json",
                       description="Evaluate the base model (or base + --adapter) on eval.tasks with lm-eval, the forward "
                       "passes sharded over Ray Data actors. Writes DIR/results.json: {'tasks': {<lm-eval task>: "
                       "{acc, acc_norm (where defined), n, chance}}}.")
    _job_args(p)
    p.add_argument("--output-dir", required=True, metavar="DIR", help="where results.json goes")
    p.add_argument("--adapter", metavar="URI", help="LoRA adapter folder (local or s3://) to evaluate on top of the base")
    p.add_argument("--label", help="name of the evaluated model in results.json (default base/tuned)")

    p = sub.add_parser("report", help="base-vs-tuned Markdown table (best, mean, same prompt, each ± SE) and PNG chart",
                       description="Write report.md, scores.png and summary.json into --output-dir from the "
                       "results.json files of `fjordtune eval`, and print the table and which changes are "
                       "larger than their noise (2 standard errors).")
    p.add_argument("--base", metavar="RESULTS_JSON", help="results.json of the base model")
    p.add_argument("--tuned", metavar="RESULTS_JSON", help="results.json of the tuned model")
    p.add_argument("--output-dir", required=True, metavar="DIR")

    p = sub.add_parser("run", help="the whole pipeline: preflight -> train -> eval base and tuned -> report",
                       description="Preflight, train, evaluate base and tuned, and report. What `ray job submit` runs. "
                       "Writes report.md, scores.png, summary.json and <model>/results.json to --output-dir and "
                       "commits them to <storage.uri>/<name>/report/. SIGTERM (`ray job stop`) aborts the training "
                       "workers, prints the checkpoint a rerun of the same job resumes from, and exits 143.")
    _job_args(p)
    p.add_argument("--output-dir", metavar="DIR", help="local output folder (default outputs/<name>)")

    p = sub.add_parser("submit", help="preflight locally, then send the job to a Ray cluster and follow it",
                       description="Validate and preflight the job here (no GPU needed), then submit `fjordtune run "
                       "JOB` to the Ray cluster at --address (or submit.address, or RAY_API_SERVER_ADDRESS) with the working "
                       "directory uploaded, and follow its logs. Exit status is the job's. When it succeeds, print "
                       "where its report is in storage (<storage.uri>/<name>/report/) and fetch it here: report.md, "
                       "scores.png, summary.json and <model>/results.json. Ctrl-C stops following, not the job, and "
                       "prints the `ray job stop` command that would.")
    _job_args(p)
    p.add_argument("--address", help="Ray dashboard address, e.g. http://127.0.0.1:8265")
    p.add_argument("--no-wait", action="store_true", help="print the submission id and return")
    p.add_argument("--skip-preflight", action="store_true", help="submit even if the estimate says it will not fit")
    p.add_argument("--output-dir", metavar="DIR", help="local output folder of the run on the cluster's driver node")
    p.add_argument("--fetch-dir", metavar="DIR",
                   help="where the report, chart, summary and results.json files of a job that succeeded are copied "
                   "from storage (default outputs/<name>, like `fjordtune run`)")
    p.add_argument("--no-fetch", action="store_true", help="leave the report in storage; print its URI only")
    _cluster_arg(p)

    p = sub.add_parser(
        "contamination", help="check every training row against every NorEval item; exit 1 when contaminated",
        description="Check every row of the job's training sources (data.train_files or data.sources; every "
        "message's content) against every NorEval item the job can see (eval.data_dir, else the hub): every "
        "family, both written standards and every split, NorCommonsenseQA's scored split `train` included, on "
        "every text field (question, choices, fact, answers). Two methods: a normalised substring match (case, "
        "whitespace, punctuation and Unicode form ignored) and word n-gram overlap. An eval text shorter than "
        "--min-words is never matched on its own. Exit status: 0 clean, 1 contaminated, 2 bad input. `train` and "
        "`run` run the same check and refuse contaminated data unless data.allow_contamination is true.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  fjordtune contamination jobs/demo.yaml\n"
        "  fjordtune contamination jobs/norskmistral-119b.yaml --json > hits.json\n"
        "  fjordtune contamination jobs/demo.yaml --remove cleaned/   # cleaned files + cleaned/removed.jsonl",
    )
    _job_args(p)
    p.add_argument("--json", action="store_true",
                   help='print {"hits": [...], "train_rows": N, "eval_items": M, "seconds": S}; each hit has '
                   "train_file, train_line, eval_dataset, eval_config, eval_split, eval_id, field, kind and span")
    p.add_argument("--remove", metavar="OUT", help="write each training file without its contaminated rows to OUT, "
                   "and the removed rows with their hits to OUT/removed.jsonl")
    p.add_argument("--ngram", type=int, metavar="N", help="word n-gram length (default: data.contamination.ngram, 13)")
    p.add_argument("--min-words", type=int, metavar="N",
                   help="shortest eval text matched on its own, in words (default: data.contamination.min_words, 8)")

    p = sub.add_parser(
        "export", help="the tuned model as a plain Hugging Face folder (base + adapter merged) or a GGUF file",
        description="Merge the LoRA adapter (attention and experts) into the job's base model and write a Hugging "
        "Face folder: config, tokenizer, safetensors shards and their index, standard key names, no peft wrappers, "
        "loadable by transformers and vLLM. The base is read the way training reads it (model.path: the released "
        "FP8 checkpoint is dequantized as read; the vision tower is left out), one block of rows at a time, so "
        "host memory stays at about one shard plus one layer. An s3:// destination is uploaded as one commit.\n\n"
        "--format gguf then converts that folder with llama.cpp's own converter (and, for q4_k_m, its quantizer) "
        "into one GGUF file, checks that llama.cpp reads it back and tokenizes like the model's tokenizer, and only "
        "then publishes it. What llama.cpp does not support is refused in one line with exit 2, writing nothing. "
        "Local disk (storage.cache_dir for s3:// destinations): the merged folder and the GGUF at once.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  fjordtune export jobs/demo.yaml --format merged\n"
        "  fjordtune export jobs/demo.yaml --format gguf --quant q8_0\n"
        "  fjordtune export jobs/norskmistral-119b.yaml --adapter s3://fjordtune-runs/norskmistral-119b/adapter "
        "--out s3://fjordtune-runs/norskmistral-119b/export/merged-bf16",
    )
    _job_args(p)
    p.add_argument("--format", choices=("merged", "gguf"), default="merged",
                   help="merged (default): a Hugging Face safetensors folder; gguf: one GGUF file for llama.cpp, "
                   "made by llama.cpp's own converter and quantizer (needs fjordtune[gguf])")
    p.add_argument("--quant", choices=("bf16", "q8_0", "q4_k_m"), default="q4_k_m",
                   help="GGUF weight type (default q4_k_m, as the story shipped: ~70 GB for the 119B model)")
    p.add_argument("--adapter", metavar="URI", help="the adapter folder, s3:// or local (default: the run's trained "
                   "adapter, <storage.uri>/<name>/adapter)")
    p.add_argument("--out", metavar="URI", help="where to write, s3:// or a new local folder (default: "
                   "<storage.uri>/<name>/export/merged, or .../export/gguf-<quant>)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype of the written weights (default bfloat16; the merge itself is computed in float32)")
    p.add_argument("--shard-size", type=float, default=5.0, metavar="GB",
                   help="largest safetensors shard, in GB (default 5, as Hugging Face's save_pretrained)")

    p = sub.add_parser(
        "serve", help="the tuned model behind an OpenAI-compatible API (Ray Serve): /v1/chat/completions, /v1/models",
        description="Deploy the tuned model as the Ray Serve application fjordtune-<name> (or --model-name) with an "
        "OpenAI-compatible /v1/chat/completions (streaming and not) and /v1/models, using the model's chat template. "
        "By default the run's adapter (<storage.uri>/<name>/adapter) is merged into the base inside the replica; "
        "--merged serves a folder written by `fjordtune export`. Engines: transformers' generate (CPU, or the GPUs "
        "of one node that preflight says hold the model) or "
        "vLLM through Ray Serve LLM (GPUs; unverified until a GPU check has run it, docs/serve.md). On a running Ray "
        "cluster (--address, RAY_ADDRESS, or one started on this machine) the application keeps running after this "
        "command returns: stop it with --down. Without a cluster, a private one is started and the server runs in "
        "the foreground until Ctrl-C.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  fjordtune serve jobs/demo.yaml\n"
        "  fjordtune serve jobs/demo.yaml --port 8001 --max-tokens 256 --max-concurrent 2\n"
        "  fjordtune serve jobs/norskmistral-119b.yaml --merged s3://fjordtune-runs/norskmistral-119b/export/merged\n"
        "  fjordtune serve jobs/demo.yaml --down",
    )
    _job_args(p)
    p.add_argument("--adapter", metavar="URI", help="adapter to merge into the base (default: the run's, "
                   "<storage.uri>/<name>/adapter)")
    p.add_argument("--merged", metavar="URI", help="serve this merged model folder (`fjordtune export` output) instead")
    p.add_argument("--engine", choices=("auto", "transformers", "vllm"), default="auto",
                   help="auto (default): vllm when resources.use_gpu, else transformers")
    p.add_argument("--model-name", metavar="NAME", help="the model id clients ask for (default: the job's name)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address of Serve's proxy (default 127.0.0.1, loopback "
                   "only; 0.0.0.0 exposes it: there is no authentication)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--max-tokens", type=int, default=512, metavar="N",
                   help="most new tokens per request; a request asking for more gets a 400 (default 512)")
    p.add_argument("--max-concurrent", type=int, default=4, metavar="N",
                   help="requests one replica works on at once; the rest wait (default 4)")
    p.add_argument("--max-queued", type=int, default=16, metavar="N",
                   help="requests waiting beyond --max-concurrent; more get 503 at once (default 16)")
    p.add_argument("--replicas", type=int, default=1, metavar="N", help="model replicas (default 1)")
    p.add_argument("--address", help="Ray cluster (GCS) address, e.g. 127.0.0.1:6379 (default: RAY_ADDRESS, or a "
                   "cluster running on this machine)")
    p.add_argument("--down", action="store_true", help="stop the served application instead")

    p = sub.add_parser(
        "checkpoints", help="list, inspect, prune or fetch a run's resumable checkpoints",
        description="Operate on the checkpoints of a run in storage. RUN is a run URI (<storage.uri>/<name>, e.g. "
        "s3://bucket/runs/demo), its checkpoints folder, or a job file (its storage.uri and name, and its storage "
        "settings). Credentials and endpoint come from the environment (AWS_*), as for every command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  fjordtune checkpoints ls s3://bucket/runs/demo\n"
        "  fjordtune checkpoints latest jobs/demo.yaml\n"
        "  fjordtune checkpoints prune s3://bucket/runs/demo --keep 2\n"
        "  fjordtune checkpoints download s3://bucket/runs/demo ./ckpt --step 8",
    )
    csub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = csub.add_parser("ls", help="every checkpoint: step, size, time and commit id; uncommitted leftovers flagged")
    c.add_argument("run", metavar="RUN")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c = csub.add_parser("latest", help="the newest committed checkpoint (what a resume uses): its URI")
    c.add_argument("run", metavar="RUN")
    c.add_argument("--json", action="store_true", help="print JSON (step, uri, commit, bytes, time, meta)")
    c = csub.add_parser("prune", help="keep the last N committed checkpoints; delete older ones and old leftovers")
    c.add_argument("run", metavar="RUN")
    c.add_argument("--keep", type=int, required=True, metavar="N", help="committed checkpoints to keep (>= 1)")
    c.add_argument("--grace-s", type=float, default=None, metavar="S",
                   help="delete uncommitted leftovers only when older than S seconds (default 3600: a younger one may "
                   "still be uploading)")
    c.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    c = csub.add_parser("download", help="copy a committed checkpoint to a local folder, verifying every checksum")
    c.add_argument("run", metavar="RUN", help="run URI, checkpoints folder, job file, or one step-N folder")
    c.add_argument("dest", metavar="DEST", help="local folder to write")
    c.add_argument("--step", type=int, help="which checkpoint (default: the latest committed)")
    return parser


def entry() -> None:
    """The console script: like `main`, and a closed pipe (`fjordtune validate --explain | head`) ends quietly."""
    import signal

    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    status = main()
    from fjordtune.stopping import stop_was_requested

    if stop_was_requested():
        # `ray job stop`: the run has said where it stopped and left Ray. The interpreter's teardown (C
        # extensions, Ray's core worker) takes about a second more, which Ray's SIGKILL, 3 s after its
        # SIGTERM, may not leave: go now
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    # the work is done: spare the interpreter's exit a garbage-collector pass over everything the command
    # built (an eval's ~600,000 lm-eval objects: 1.5 s), which exit frees anyway
    gc.freeze()
    sys.exit(status)


def main(argv: list[str] | None = None) -> int:
    """Run one command; return the exit status. A fjordtune error (also one wrapped by Ray) prints one
    `error:` line per problem and returns its status (2 input, 3 infrastructure); anything else is a bug:
    its traceback, then one `error: internal error (...)` line, and 4 (the same for `InternalError`)."""
    import traceback

    from fjordtune.errors import InternalError, find_fjordtune_error

    internal = "internal error (a bug in fjordtune, please report it)"
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "botocore", "filelock", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(COMMANDS[args.command](args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # SystemExit is not an Exception: it passes
        found = e if isinstance(e, FjordtuneError) else find_fjordtune_error(e)
        if found is None or found.exit_code == InternalError.exit_code:
            traceback.print_exc(file=sys.stderr)
        if found is None:
            first = (str(e).strip().splitlines() or [""])[0]
            print(f"error: {internal}: {type(e).__name__}: {first[:500]}", file=sys.stderr)
            return InternalError.exit_code
        for line in found.lines:
            print(f"error: {internal}: {line}" if found.exit_code == InternalError.exit_code else f"error: {line}",
                  file=sys.stderr)
        return found.exit_code


def _load(args: argparse.Namespace) -> Any:
    from fjordtune.config import load_job

    return load_job(args.job, args.overrides)


def cmd_validate(args: argparse.Namespace) -> int:
    from fjordtune.config import load_job

    if args.explain:
        from fjordtune.config.docs import explain

        print(explain())
        if not args.jobs:
            return 0
    if not args.jobs:
        raise ConfigError("validate: name at least one job file (or use --explain)")
    errors: list[str] = []
    for path in args.jobs:
        try:
            job = load_job(path, args.overrides)
            print(f"ok: {path} ({job.name})")
        except ConfigError as e:
            errors.extend(e.lines)
    if errors:
        raise ConfigError(*errors)
    return 0


def cmd_preflight(args: argparse.Namespace) -> int:
    from fjordtune.preflight.gate import check
    from fjordtune.preflight.placement import read_cluster_file

    job = _load(args)
    cluster = read_cluster_file(args.cluster) if args.cluster else None
    report = check(job, refuse=False, cluster=cluster, method=args.method)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.text)
    return 0 if report.fits else 2


def cmd_train(args: argparse.Namespace) -> int:
    from fjordtune import pipeline
    from fjordtune.storage import Store

    job = _load(args)
    Store.for_job(job).check_bucket(job.storage.uri)  # a storage problem shows in seconds, before the estimate
    data = pipeline.check_data(job)  # bad rows and contamination: refused before the estimate and any worker
    predicted = None
    if not args.skip_preflight:
        predicted = pipeline.preflight(job).estimate.total_bytes
    info = pipeline.train(job, predicted_peak_bytes=predicted, data=data)
    print(json.dumps(info, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fjordtune import pipeline

    pipeline.evaluate(_load(args), output_dir=args.output_dir, adapter_uri=args.adapter, label=args.label)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fjordtune.report import write_report

    if not (args.base or args.tuned):
        raise ConfigError("report: give --base and/or --tuned results.json files")
    loaded = {}
    for key in ("base", "tuned"):
        path = getattr(args, key)
        if path:
            try:
                loaded[key] = json.loads(Path(path).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"report --{key} {path}: cannot read results ({e})") from None
    paths = write_report(output_dir=args.output_dir, base=loaded.get("base"), tuned=loaded.get("tuned"))
    print(paths["table"])
    print(f"\n{paths['words']}")
    print(f"\nreport: {paths['markdown']}\nchart:  {paths['png']}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from fjordtune import pipeline
    from fjordtune.stopping import StopRequested

    job = _load(args)
    try:
        pipeline.run(job, output_dir=args.output_dir or f"outputs/{job.name}")
    except StopRequested as stop:  # `ray job stop`: the workers are aborted; say where a rerun resumes
        print(stop.line, flush=True)
        return stop.exit_code
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from fjordtune.submit import submit

    return submit(args.job, overrides=args.overrides, address=args.address, wait=not args.no_wait,
                  skip_preflight=args.skip_preflight, output_dir=args.output_dir, cluster=args.cluster,
                  fetch_dir=args.fetch_dir, fetch=not args.no_fetch)


def cmd_contamination(args: argparse.Namespace) -> int:
    import time

    from fjordtune.data.contamination import check_rows, write_removed
    from fjordtune.data.prepare import eval_index, hit_line
    from fjordtune.data.sources import iter_source
    from fjordtune.storage import Store

    overrides = list(args.overrides)
    if args.ngram is not None:
        overrides.append(f"data.contamination.ngram={args.ngram}")
    if args.min_words is not None:
        overrides.append(f"data.contamination.min_words={args.min_words}")
    from fjordtune.config import load_job

    job = load_job(args.job, overrides)
    store = Store.for_job(job)
    t0 = time.perf_counter()
    index = eval_index(job)

    def rows() -> Any:
        for i, src in enumerate(job.data.source_list):
            key = f"data.sources[{i}]" if job.data.sources else "data.train_files"
            for r in iter_source(src, store=store, on_bad_row=job.data.on_bad_row, key=key):
                yield r.file, r.line, r.row

    result = check_rows(rows(), index)
    result.seconds = time.perf_counter() - t0  # the whole check, indexing included
    removed = write_removed(rows(), result, args.remove) if args.remove else None
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        for h in result.hits[:50]:
            print(hit_line(h))
        if len(result.hits) > 50:
            print(f"... and {len(result.hits) - 50} more hits (--json lists them all)")
        bad = len(result.contaminated_rows)
        c = job.data.contamination
        verdict = f"CONTAMINATED: {bad} rows, {len(result.hits)} hits" if bad else "clean"
        print(f"{result.train_rows} training rows against {result.eval_items} NorEval items (normalised substring "
              f"and {c.ngram}-gram, texts of {c.min_words}+ words) in {result.seconds:.1f} s: {verdict}")
    if removed:
        print(f"cleaned files and removed rows written to {args.remove}: "
              + ", ".join(str(p) for p in removed.values()), file=sys.stderr if args.json else sys.stdout)
    return 1 if result.hits else 0


def cmd_export(args: argparse.Namespace) -> int:
    from fjordtune.errors import UserError
    from fjordtune.export.merged import export_job

    if args.shard_size <= 0:
        raise UserError(f"--shard-size {args.shard_size}: give a positive size in GB")
    where, summary = export_job(_load(args), adapter=args.adapter, out=args.out, dtype=args.dtype,
                                shard_bytes=int(args.shard_size * 1e9), format=args.format, quant=args.quant)
    print(summary.line().replace(str(summary.out_dir), where))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from fjordtune.errors import UserError
    from fjordtune.serve import app

    job = _load(args)
    for flag in ("max_tokens", "max_concurrent", "replicas", "port"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give a positive number")
    if args.max_queued < 0:
        raise UserError(f"--max-queued {args.max_queued}: give 0 or more")
    options = app.ServeOptions(model_id=args.model_name or job.name, engine=app.pick_engine(job, args.engine),
                               host=args.host, port=args.port, max_tokens=args.max_tokens,
                               max_concurrent=args.max_concurrent, max_queued=args.max_queued, replicas=args.replicas)
    if args.down:
        app.connect(args.address)
        gone = app.shutdown(options.app_name)
        print(f"serve: {options.app_name} {'deleted' if gone else 'was not running'}")
        return 0
    # everything that can be refused is refused before Ray is joined or started
    source = app.resolve_source(job, adapter=args.adapter, merged=args.merged, engine=options.engine)
    if options.engine == "vllm":
        app.require_vllm()
    else:
        import dataclasses

        options = dataclasses.replace(options, gpus_per_replica=app.gpus_for_transformers(job))
    private = app.connect(args.address)
    print(f"serve: deploying {options.app_name} ({options.engine}: {source.describe()}); the first start loads "
          "and merges the model", flush=True)
    app.deploy(job, source, options)
    print(f"serve: {options.model_id} answers at {options.base_url} (Ray Serve application {options.app_name})")
    for line in app.client_lines(options):
        print(f"  {line}")
    if not private:
        print(f"stop it with: fjordtune serve {args.job} --down")
        return 0
    print("serving in the foreground (no Ray cluster was running); Ctrl-C stops it", flush=True)
    import time

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


def cmd_checkpoints(args: argparse.Namespace) -> int:
    import time

    from fjordtune.storage import Store
    from fjordtune.storage import checkpoints as ckpts
    from fjordtune.storage.store import LEFTOVER_GRACE_S, human_size

    target = args.run
    if target.endswith((".yaml", ".yml")) and Path(target).is_file():
        from fjordtune.config import load_job

        job = load_job(target, [])
        store, target = Store.for_job(job), job.run_uri
    else:
        store = Store()
    if args.action == "download" and ckpts.is_checkpoint_uri(target):
        if not store.is_committed(target):
            raise ConfigError(f"{target}: not a committed checkpoint")
        uri = target
    else:
        folder = ckpts.resolve(target)
        store.check_bucket(folder)
        if args.action == "ls":
            infos = ckpts.list_checkpoints(store, folder)
            print(json.dumps([i.as_dict() for i in infos], indent=2) if args.json else ckpts.format_table(infos))
            return 0
        if args.action == "latest":
            info = ckpts.latest(store, folder)
            if info is None:
                print(f"{folder}: no committed checkpoint", file=sys.stderr)
                return 1
            print(json.dumps(info.as_dict(), indent=2) if args.json else info.uri)
            return 0
        if args.action == "prune":
            grace = LEFTOVER_GRACE_S if args.grace_s is None else args.grace_s
            res = ckpts.prune(store, folder, keep=args.keep, grace_s=grace, dry_run=args.dry_run)
            verb = "would delete" if args.dry_run else "deleted"
            for info in res.deleted:
                print(f"{verb} step {info.step} ({human_size(info.size)}, commit {info.pointer.commit})")
            for item in res.cleaned:
                print(f"{verb} uncommitted leftover {item}")
            for item in res.spared:
                print(f"kept uncommitted leftover {item}: younger than {grace:g} s (may still be uploading)")
            print(f"kept {len(res.kept)} committed: steps {', '.join(str(i.step) for i in res.kept) or '-'}")
            return 0
        uri = ckpts.find(store, folder, args.step).uri
    start = time.monotonic()
    dest = ckpts.download(store, uri, args.dest)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"downloaded {uri} (commit {store.commit_id(uri)}, {human_size(size)}, checksums verified) to {dest} "
          f"in {time.monotonic() - start:.1f} s")
    return 0


COMMANDS = {
    "validate": cmd_validate, "preflight": cmd_preflight, "train": cmd_train, "eval": cmd_eval,
    "report": cmd_report, "run": cmd_run, "submit": cmd_submit, "checkpoints": cmd_checkpoints,
    "contamination": cmd_contamination, "export": cmd_export, "serve": cmd_serve,
}
