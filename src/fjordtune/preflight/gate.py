"""The preflight gate: will this job fit, and does its LoRA cover what it claims? Decided from the
model's config alone (no weights, no GPU), before a single accelerator is allocated."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fjordtune.config.schema import JobSpec
from fjordtune.errors import PreflightRefused, UserError
from fjordtune.preflight.estimate import (
    DEFAULT_GATHERED_LAYERS_FORWARD,
    GiB,
    MemoryEstimate,
    estimate_memory,
    explain_refusal,
    min_workers,
    usable_bytes,
)
from fjordtune.preflight.loading import LoadingEstimate, estimate_loading
from fjordtune.preflight.params import ParamCounts
from fjordtune.preflight.placement import ClusterShape, Placement, check_placement, shape_from_gpus_per_node

if TYPE_CHECKING:
    from fjordtune.preflight.traced import TracedEstimate

log = logging.getLogger(__name__)

CPU_RUNTIME_OVERHEAD_BYTES = 1 * GiB
"""A CPU worker has no CUDA context or NCCL buffers, but torch, transformers and Ray cost about 1 GiB."""
MAX_WORKERS_SEARCHED = 64
GATHERED_LAYERS_FORWARD = {"explicit": 2, "implicit": DEFAULT_GATHERED_LAYERS_FORWARD}
"""Unsharded layer copies at the forward peak per `train.forward_prefetch` (traced: 2 and 3)."""


EVAL_TOKENS_PER_REQUEST = 1024
"""Tokens assumed per scored request for the KV cache term (NorEval prompts are far shorter, 0-shot)."""
EVAL_CONTINUATION_TOKENS = 64
"""Tokens assumed per continuation for the fp32 logits term (NorEval choices are a few words)."""


@dataclass(frozen=True)
class EvalEstimate:
    """Memory of one scoring actor: the whole model (it is not sharded) plus a batch of logits."""

    weights_bytes: int
    logits_bytes: int
    runtime_bytes: int
    gpus_per_worker: int
    usable_bytes: int  # over all of the actor's GPUs
    kv_cache_bytes: int = 0
    """A batch's contexts in the KV cache, copied once per continuation (shared-context scoring)."""

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.logits_bytes + self.kv_cache_bytes + self.runtime_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_bytes

    def line(self) -> str:
        return (f"eval: {self.total_bytes / GiB:.1f} GiB per scoring actor (weights {self.weights_bytes / GiB:.1f}, "
                f"logits {self.logits_bytes / GiB:.1f}, KV cache {self.kv_cache_bytes / GiB:.1f}, "
                f"runtime {self.runtime_bytes / GiB:.1f}) on "
                f"{self.gpus_per_worker} GPU(s), {self.usable_bytes / GiB:.1f} GiB usable")


@dataclass(frozen=True)
class PreflightReport:
    fits: bool
    text: str
    estimate: MemoryEstimate
    capacity_bytes: int
    usable_bytes: int
    device: str  # "gpu" or "cpu"
    lora_coverage: str
    eval: EvalEstimate | None = None
    placement: Placement | None = None
    min_gpus: int | None = None
    """Smallest training worker count that fits in memory (GPU runs; None on CPU or when none does)."""
    loading: LoadingEstimate | None = None
    traced: TracedEstimate | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "device": self.device,
            "num_workers": self.estimate.num_workers,
            "per_worker_bytes": self.estimate.total_bytes,
            "per_worker_live_bytes": self.estimate.live_bytes,
            "capacity_bytes": self.capacity_bytes,
            "usable_bytes": self.usable_bytes,
            "peak_moment": self.estimate.peak_moment,
            "terms": [{"key": t.key, "label": t.label, "bytes": t.bytes, "live": t.live} for t in self.estimate.terms],
            "eval": None if self.eval is None else {
                "fits": self.eval.fits, "per_actor_bytes": self.eval.total_bytes,
                "gpus_per_worker": self.eval.gpus_per_worker, "usable_bytes": self.eval.usable_bytes,
            },
            "min_gpus": self.min_gpus,
            "placement": None if self.placement is None else self.placement.as_dict(),
            "loading": None if self.loading is None else self.loading.as_dict(),
            "traced": None if self.traced is None else {
                **self.traced.as_dict(),
                "analytic_training_live_bytes": self.estimate.live_bytes,
                "analytic_loading_bytes": None if self.loading is None else self.loading.traced_comparable_bytes,
            },
        }


def model_config(job: JobSpec, *, full: bool = False) -> Any:
    """The transformers config of the job's base model (its text model's, unless `full`), fetched without
    its weights."""
    from transformers import AutoConfig

    from fjordtune.model.load import BUILTIN_PREFIX, builtin_config, load_tokenizer

    path = job.model.path
    if path.startswith(BUILTIN_PREFIX):
        tok = load_tokenizer(job.model.tokenizer or "builtin:demo")
        config = builtin_config(path[len(BUILTIN_PREFIX):], vocab_size=len(tok))
    elif path.startswith("s3://"):
        from fjordtune.storage import Store

        data = Store.for_job(job).read_file(path, "config.json")
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "config.json").write_bytes(data)
            config = AutoConfig.from_pretrained(tmp)
    else:
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"model.path: {path}: cannot read the model config ({first})") from None
    # multimodal wrappers (the released Mistral Small 4 loads via Mistral3): train the text model
    return config if full else getattr(config, "text_config", None) or config


def checkpoint_bytes_per_param(config: Any) -> float | None:
    """Bytes one stored parameter takes in the checkpoint (FP8: 1), from the full config; None if unsaid."""
    quant = getattr(config, "quantization_config", None)
    quant = quant if isinstance(quant, dict) else getattr(quant, "to_dict", lambda: {})()
    if str(quant.get("quant_method", "")).lower() in ("fp8", "fbgemm_fp8"):
        return 1
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return {"bfloat16": 2, "float16": 2, "float32": 4}.get(str(dtype).removeprefix("torch."))


def count(job: JobSpec) -> ParamCounts:
    return ParamCounts.from_config(
        model_config(job), lora_rank=job.lora.rank, lora_target_modules=job.lora.target_modules,
        lora_target_parameters=job.lora.target_parameters,
    )


def capacity(job: JobSpec) -> tuple[int, str]:
    """Bytes one worker may use: the accelerator's memory, or this machine's free memory shared by the
    CPU workers (the demo and tests run them all on one node)."""
    if job.resources.use_gpu:
        return int(job.resources.accelerator_memory_gib * GiB), "gpu"
    import psutil

    return int(psutil.virtual_memory().available / job.resources.num_workers), "cpu"


def estimate_eval(job: JobSpec, counts: ParamCounts, capacity_bytes: int, *, gpus: int | None = None) -> EvalEstimate:
    """One scoring replica holds the whole base model (bf16/fp32; the adapter is merged into it at load,
    its fp32 copy freed), a batch's KV cache (every request's copy of its context) and the logits of the
    continuations (a context's last position only: shared-context scoring)."""
    from fjordtune.preflight.estimate import DEFAULT_RUNTIME_OVERHEAD_BYTES

    pb = 2 if job.model.dtype == "bfloat16" else 4
    gpus = gpus or (job.eval.gpus_per_worker if isinstance(job.eval.gpus_per_worker, int) else 1)
    return EvalEstimate(
        weights_bytes=counts.total_params * pb + counts.lora_params * 4,
        logits_bytes=job.eval.batch_size * EVAL_CONTINUATION_TOKENS * counts.vocab_size * 4,
        kv_cache_bytes=job.eval.batch_size * EVAL_TOKENS_PER_REQUEST * counts.num_layers * (counts.k_dim + counts.v_dim)
        * pb,
        runtime_bytes=DEFAULT_RUNTIME_OVERHEAD_BYTES * gpus,
        gpus_per_worker=gpus,
        usable_bytes=usable_bytes(capacity_bytes, job.resources.memory_headroom) * gpus,
    )


@dataclass(frozen=True)
class EvalPlan:
    """How many scoring replicas, and how many GPUs each: what `eval.num_workers` / `eval.gpus_per_worker`
    say, or with `auto` what preflight's inference estimate and `resources.gpus_per_node` give."""

    replicas: int
    gpus_per_replica: int
    """0 on CPUs."""
    auto_replicas: bool
    note: str

    def line(self) -> str:
        return f"eval plan: {self.note}"


def plan_eval(job: JobSpec, counts: ParamCounts | None = None, capacity_bytes: int | None = None) -> EvalPlan:
    """Replicas and GPUs per replica. GPUs per replica (auto): the fewest, up to a node's, whose memory holds
    the model and a batch. Replicas (auto): every GPU of the nodes the training ranks fill, in replicas of
    that size (at run time: as many as the live cluster holds at once)."""
    e = job.eval
    auto = e.num_workers == "auto"
    if not job.resources.use_gpu:
        n = job.resources.num_workers if auto else int(e.num_workers)
        return EvalPlan(n, 0, auto, f"{n} CPU scoring replica(s)" + (" (resources.num_workers)" if auto else ""))
    per_node = job.resources.gpus_per_node
    if isinstance(e.gpus_per_worker, int):
        g, why = e.gpus_per_worker, "eval.gpus_per_worker"
    else:
        counts = counts or count(job)
        cap = capacity_bytes if capacity_bytes is not None else capacity(job)[0]
        fitting = [g for g in range(1, per_node + 1) if estimate_eval(job, counts, cap, gpus=g).fits]
        g = fitting[0] if fitting else per_node
        need = estimate_eval(job, counts, cap, gpus=g)
        why = (f"the fewest GPUs that hold {need.total_bytes / GiB:.0f} GiB" if fitting
               else f"no {per_node} GPUs of a node hold {need.total_bytes / GiB:.0f} GiB")
    nodes = -(-job.resources.num_workers // per_node)
    n = nodes * max(1, per_node // g) if auto else int(e.num_workers)
    used = n * g
    idle = nodes * per_node - used if auto else None
    note = (f"{n} replica(s) x {g} GPU(s) ({why}); " +
            (f"{used} of the {nodes * per_node} GPUs of {nodes} node(s) busy" + (f", {idle} idle" if idle else "")
             if auto else "eval.num_workers"))
    return EvalPlan(n, g, auto, note)


def placement(job: JobSpec, cluster: ClusterShape | None = None, plan: EvalPlan | None = None) -> Placement:
    """Training ranks and eval actors on `cluster`'s nodes, or on nodes of `resources.gpus_per_node` GPUs."""
    plan = plan or plan_eval(job)
    return check_placement(
        cluster or shape_from_gpus_per_node(job.resources.gpus_per_node, use_gpu=job.resources.use_gpu),
        num_workers=job.resources.num_workers, use_gpu=job.resources.use_gpu,
        cpus_per_worker=job.resources.cpus_per_worker,
        eval_actors=plan.replicas if job.eval.models else None, gpus_per_eval_actor=max(1, plan.gpus_per_replica),
    )


def check(job: JobSpec, *, refuse: bool = True, counts: ParamCounts | None = None,
          cluster: ClusterShape | None = None, method: str = "analytic") -> PreflightReport:
    """Estimate the job's per-worker peak (training and loading) and place its ranks and eval actors (on
    `cluster`'s nodes when given); raise `PreflightRefused` (if `refuse`) when it cannot fit or be placed,
    or when a LoRA target matches nothing. `method="traced"` also runs the real setup and training step on
    fake tensors (`preflight/traced.py`) and prints its figures beside the analytic ones."""
    if method not in ("analytic", "traced"):
        raise UserError(f"preflight --method {method!r}: use analytic or traced")
    full_config = model_config(job, full=True)
    counts = counts or ParamCounts.from_config(
        getattr(full_config, "text_config", None) or full_config, lora_rank=job.lora.rank,
        lora_target_modules=job.lora.target_modules, lora_target_parameters=job.lora.target_parameters)
    if counts.lora_unmatched_targets:
        raise PreflightRefused(
            f"lora: {', '.join(counts.lora_unmatched_targets)} match nothing in this model; peft would skip "
            "them silently (the story's adapter trained only o_proj this way)",
            counts.lora_coverage(job.lora.expert_impl),
        )
    cap, device = capacity(job)
    kwargs = dict(
        seq_len=job.data.max_seq_len, micro_batch_size=job.train.micro_batch_size,
        activation_checkpointing=job.train.activation_checkpointing,
        param_bytes=2 if job.model.dtype == "bfloat16" else 4, expert_impl=job.lora.expert_impl,
        num_gathered_layers_forward=GATHERED_LAYERS_FORWARD[job.train.forward_prefetch],
    )
    if device == "cpu":
        kwargs["runtime_overhead_bytes"] = CPU_RUNTIME_OVERHEAD_BYTES
    est = estimate_memory(counts, num_workers=job.resources.num_workers, **kwargs)
    headroom = job.resources.memory_headroom
    fits = est.fits(cap, headroom)
    usable = usable_bytes(cap, headroom)
    unit = "GPU" if device == "gpu" else "CPU worker"
    verdict = (
        f"train: fits: {est.total_bytes / GiB:.1f} GiB per {unit} of {usable / GiB:.1f} GiB usable "
        f"({cap / GiB:.1f} GiB, {headroom:.0%} headroom)"
        if fits
        else "train: REFUSED: " + explain_refusal(
            counts, num_workers=job.resources.num_workers, capacity_bytes=cap,
            max_workers=max(MAX_WORKERS_SEARCHED, job.resources.num_workers), headroom_fraction=headroom, **kwargs,
        )
    )
    lines = [f"== preflight {job.name}", counts.lora_coverage(job.lora.expert_impl), est.table(), verdict]
    plan = plan_eval(job, counts, cap) if job.eval.models else None
    ev = estimate_eval(job, counts, cap, gpus=plan.gpus_per_replica) if plan and device == "gpu" else None
    if plan is not None:
        lines.append(plan.line())
    if ev is not None:
        if ev.fits:
            lines.append(ev.line().replace("eval: ", "eval: fits: ", 1))
        else:
            per_gpu = usable_bytes(cap, headroom)
            need = -(-(ev.total_bytes - ev.runtime_bytes) // (per_gpu - ev.runtime_bytes // ev.gpus_per_worker))
            fix = (f"set eval.gpus_per_worker: {need} (or more, or auto)" if need <= job.resources.gpus_per_node
                   else f"that is {need} GPUs, more than a node's {job.resources.gpus_per_node} "
                   "(resources.gpus_per_node): use GPUs with more memory or nodes with more of them")
            lines.append(ev.line().replace("eval: ", "eval: REFUSED: ", 1) + "; a scoring actor holds the whole "
                         f"model: {fix}")
            fits = False
    min_gpus = None
    if device == "gpu":
        min_gpus = min_workers(counts, capacity_bytes=cap, headroom_fraction=headroom,
                               max_workers=max(MAX_WORKERS_SEARCHED, job.resources.num_workers), **kwargs)
    placed = placement(job, cluster, plan)
    lines.extend(placed.lines())
    fits = fits and placed.fits
    stored = checkpoint_bytes_per_param(full_config)
    loading = estimate_loading(
        counts, num_workers=job.resources.num_workers, ranks_per_node=max(placed.train.ranks_per_node, default=1),
        load_bytes=kwargs["param_bytes"], checkpoint_bytes_per_param=stored, on_cpu=device == "cpu")
    lines.extend(loading.lines())
    memory = [g.memory_bytes for g in (cluster.groups if cluster else ()) if g.gpus and g.memory_bytes]
    if device == "gpu" and memory and loading.host_bytes_per_node > max(memory):
        lines.append(f"loading: REFUSED: {loading.ranks_per_node} ranks loading at once need "
                     f"{loading.host_bytes_per_node / GiB:.1f} GiB of host memory on a node, the cluster's GPU nodes "
                     f"have {max(memory) / GiB:.1f} GiB")
        fits = False
    traced = None
    if method == "traced":
        from fjordtune.preflight.traced import trace_memory

        traced = trace_memory(job, getattr(full_config, "text_config", None) or full_config,
                              checkpoint_bytes_per_param=stored)
        lines.extend(_traced_lines(traced, est.live_bytes, loading.traced_comparable_bytes))
    lines.append("preflight: OK" if fits else "preflight: REFUSED")
    text = "\n".join(lines)
    report = PreflightReport(fits, text, est, cap, usable, device, counts.lora_coverage(job.lora.expert_impl), ev,
                             placement=placed, min_gpus=min_gpus, loading=loading, traced=traced)
    if not fits and refuse:
        raise PreflightRefused(text, "refused before any accelerator was allocated; "
                               "`fjordtune train --skip-preflight` overrides at your own risk")
    return report



def _traced_lines(traced: TracedEstimate, analytic_live: int, analytic_loading: int) -> list[str]:
    def vs(t: int, a: int) -> str:
        return f"traced {t / GiB:.2f} GiB, analytic {a / GiB:.2f} GiB ({(a - t) / max(t, 1):+.1%})"

    return [f"traced ({traced.num_workers} ranks on fake tensors, {traced.seconds:.0f} s): live tensors per rank",
            f"  training peak: {vs(traced.training_peak_bytes, analytic_live)}",
            f"  loading peak (shards + one chunk's staging): {vs(traced.loading_peak_bytes, analytic_loading)}"]
