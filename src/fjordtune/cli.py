"""The `fjordtune` command: thin wrappers over importable functions.

Exit status: 0 ok, 2 bad input (job file, flags, a job that will not fit), 3 infrastructure
failure (storage, Ray), 4 internal error.
"""

from __future__ import annotations

import argparse
import json
import logging
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

    p = sub.add_parser("report", help="base-vs-tuned Markdown table and PNG chart from results.json files",
                       description="Write report.md, scores.png and summary.json into --output-dir from the "
                       "results.json files of `fjordtune eval`.")
    p.add_argument("--base", metavar="RESULTS_JSON", help="results.json of the base model")
    p.add_argument("--tuned", metavar="RESULTS_JSON", help="results.json of the tuned model")
    p.add_argument("--output-dir", required=True, metavar="DIR")

    p = sub.add_parser("run", help="the whole pipeline: preflight -> train -> eval base and tuned -> report",
                       description="Preflight, train, evaluate base and tuned, and report. What `ray job submit` runs.")
    _job_args(p)
    p.add_argument("--output-dir", metavar="DIR", help="local output folder (default outputs/<name>)")

    p = sub.add_parser("submit", help="preflight locally, then send the job to a Ray cluster and follow it",
                       description="Validate and preflight the job here (no GPU needed), then submit `fjordtune run "
                       "JOB` to the Ray cluster at --address (or submit.address, or RAY_API_SERVER_ADDRESS) with the working "
                       "directory uploaded, and follow its logs. Exit status is the job's.")
    _job_args(p)
    p.add_argument("--address", help="Ray dashboard address, e.g. http://127.0.0.1:8265")
    p.add_argument("--no-wait", action="store_true", help="print the submission id and return")
    p.add_argument("--skip-preflight", action="store_true", help="submit even if the estimate says it will not fit")
    p.add_argument("--output-dir", metavar="DIR", help="local output folder of the run on the cluster's driver node")
    _cluster_arg(p)
    return parser


def entry() -> None:
    """The console script: like `main`, and a closed pipe (`fjordtune validate --explain | head`) ends quietly."""
    import signal

    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "botocore", "filelock", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(COMMANDS[args.command](args) or 0)
    except FjordtuneError as e:
        for line in e.lines:
            print(f"error: {line}", file=sys.stderr)
        if e.exit_code == 4:
            raise
        return e.exit_code
    except KeyboardInterrupt:
        return 130


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

    job = _load(args)
    if not args.skip_preflight:
        pipeline.preflight(job)
    info = pipeline.train(job)
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
    print(f"\nreport: {paths['markdown']}\nchart:  {paths['png']}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from fjordtune import pipeline

    job = _load(args)
    pipeline.run(job, output_dir=args.output_dir or f"outputs/{job.name}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from fjordtune.submit import submit

    return submit(args.job, overrides=args.overrides, address=args.address, wait=not args.no_wait,
                  skip_preflight=args.skip_preflight, output_dir=args.output_dir, cluster=args.cluster)


COMMANDS = {
    "validate": cmd_validate, "preflight": cmd_preflight, "train": cmd_train, "eval": cmd_eval,
    "report": cmd_report, "run": cmd_run, "submit": cmd_submit,
}
