"""The job-file schema: one typed, frozen section per subsystem.

The section and key names below are the user interface of fjordtune: keep them stable. Each field's
description is the documentation (`fjordtune validate --explain` prints them).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationInfo, field_validator, model_validator

#: LoRA targets that cover Mistral4's MLA attention projections (there is no k_proj / v_proj).
MISTRAL4_ATTENTION_TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
#: Mistral4's fused routed experts are 3-D parameters, reachable only through `target_parameters`.
MISTRAL4_EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
#: Arguments lm-eval passes to the tokenizer's `apply_chat_template` itself (`HFLM.apply_chat_template`).
LM_EVAL_CHAT_TEMPLATE_KWARGS = ("conversation", "tokenize", "add_generation_prompt", "continue_final_message")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelSection(Section):
    """The base model to adapt."""

    path: str = Field(
        description="Base model: a local folder, an s3:// URI of a saved folder, a hub id, or "
        "`builtin:<preset>` (a random-init model built from a config, e.g. builtin:tiny-mistral4)."
    )
    tokenizer: str | None = Field(
        default=None,
        description="Tokenizer location if not in `path` (folder, s3:// URI, hub id or builtin:demo).",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        default="bfloat16", description="Dtype of the frozen base weights during training and eval."
    )
    seed: int = Field(default=0, description="Seed for builtin random-init models.")


class LoraSection(Section):
    """LoRA adapter: rank, scale and what it wraps."""

    rank: int = Field(default=32, gt=0, description="LoRA rank r.")
    alpha: float = Field(default=64, gt=0, description="LoRA alpha (scale = alpha / rank).")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(MISTRAL4_ATTENTION_TARGETS),
        description="nn.Linear module names to adapt (peft `target_modules`). Coverage is printed "
        "before training, and a name that matches nothing is an error.",
    )
    target_parameters: list[str] = Field(
        default_factory=lambda: list(MISTRAL4_EXPERT_TARGETS),
        description="Parameter names to adapt directly (peft `target_parameters`), for fused expert "
        "weights that are not nn.Linear.",
    )
    expert_impl: Literal["peft", "grouped"] = Field(
        default="grouped",
        description="How LoRA on fused expert stacks (target_parameters) is computed. `grouped`: x@W + "
        "scale*(x@A)@B per expert through grouped matrix multiplies, never forming W+BA (for Mistral Small 4 "
        "about 6 GiB less per GPU with checkpointing); same adapter file and outputs as peft. `peft`: peft's "
        "own, which materialises W+BA for every stack. Where grouped does not apply (an experts module outside "
        "transformers' experts interface), peft's is used and the coverage table says why.",
    )

    @model_validator(mode="after")
    def _some_target(self) -> LoraSection:
        if not self.target_modules and not self.target_parameters:
            raise ValueError("target_modules and target_parameters are both empty: nothing would train")
        return self


class DataSource(Section):
    """One source of a training mixture (`data.sources`)."""

    path: str | None = Field(
        default=None, description="A JSON-lines (.jsonl) or Parquet (.parquet) file of chat rows {messages: [{role, "
        "content}, ...]}: a local path or an s3:// URI. One of path or hf.",
    )
    hf: str | None = Field(
        default=None, description="A Hugging Face dataset id (or a local `datasets` folder) read through "
        "`datasets.load_dataset`, where the hub is reachable. One of path or hf.",
    )
    hf_config: str | None = Field(default=None, description="The dataset's configuration (subset), for hf.")
    split: str = Field(default="train", description="The dataset's split, for hf.")
    name: str | None = Field(
        default=None, description="Label in the manifest and the report; default: the file name or dataset id."
    )
    weight: float | None = Field(
        default=None, gt=0, description="Rows to take as a multiple of the source's rows left after de-duplication "
        "and filters: 0.5 samples half of them, 2 takes every row twice, 1 (the default) each once. Not with count.",
    )
    count: int | None = Field(
        default=None, gt=0, description="Exactly this many rows, sampled without repeats while the source has "
        "enough (more than it has: every row, repeated, then a sample of the rest). Not with weight.",
    )

    @model_validator(mode="after")
    def _one_each(self) -> DataSource:
        if (self.path is None) == (self.hf is None):
            raise ValueError("give exactly one of path (a file or s3:// object) or hf (a dataset id)")
        if self.weight is not None and self.count is not None:
            raise ValueError("give weight or count, not both")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.hf is not None:
            return self.hf + (f"/{self.hf_config}" if self.hf_config else "") + f":{self.split}"
        return self.path.rstrip("/").rsplit("/", 1)[-1]  # type: ignore[union-attr]


class ContaminationSection(Section):
    """How training rows are matched against every NorEval item (`fjordtune contamination`)."""

    ngram: int = Field(default=13, ge=3, description="Word n-gram length of the overlap match.")
    min_words: int = Field(
        default=8, ge=1, description="Eval texts shorter than this many words are never matched on their own (a "
        "one-word choice would flag every row using the word); texts from min_words up to ngram words are "
        "matched whole.",
    )


class DataSection(Section):
    """Instruction-tuning data: the mixture, its formatting and filters, and the contamination check."""

    train_files: list[str] = Field(
        default_factory=list,
        description="The simple form: JSON-lines or Parquet files of chat rows {messages: [{role, content}, ...]}, "
        "local paths or s3:// URIs, each taken whole (weight 1). Or give sources.",
    )
    sources: list[DataSource] = Field(
        default_factory=list, description="The mixture form: a list of sources, each with a weight or a count "
        "(see data.sources[].*). Sampling is deterministic from mixture_seed; the manifest (rows per source, what "
        "each filter removed, a content hash, the seed) is saved with the run and shown in the report.",
    )
    mixture_seed: int = Field(default=0, description="Seed of the mixture's sampling (weights below 1 and counts).")
    dedup: Literal["none", "exact", "normalised"] = Field(
        default="normalised", description="Drop repeated rows, keeping the first (in source order): `exact` "
        "compares the messages as written; `normalised` also ignores case, whitespace, punctuation and Unicode "
        "form. Counts per source in the manifest.",
    )
    min_chars: int = Field(
        default=1, ge=0, description="Leave out rows whose assistant replies hold fewer characters (counted).",
    )
    max_chars: int | None = Field(
        default=None, gt=0, description="Leave out rows whose messages hold more characters in all (counted); "
        "token length is max_seq_len's business.",
    )
    on_bad_row: Literal["error", "skip"] = Field(
        default="error", description="A row that is not valid JSON or not a chat row: `error` stops with the "
        "file, line and what is wrong; `skip` leaves it out and counts it per source (the first few are logged).",
    )
    allow_contamination: bool = Field(
        default=False, description="Train even when training rows contain NorEval test items (the check still "
        "runs, and the report says what it found). false: `train` and `run` refuse, naming the first hits.",
    )
    contamination: ContaminationSection = Field(default_factory=ContaminationSection)
    max_seq_len: int = Field(
        default=1024, gt=8, description="Longest training sequence in tokens; longer rows are counted and reported "
        "before training, then cut or dropped (`truncation`). With `packing`, the length of every packed sequence.",
    )
    truncation: Literal["truncate", "drop"] = Field(
        default="truncate", description="Rows longer than max_seq_len: `truncate` cuts them (a row left with no "
        "assistant token is dropped), `drop` leaves them out. The counts are logged before training either way.",
    )
    packing: bool = Field(
        default=False, description="Concatenate whole examples into sequences of up to max_seq_len tokens "
        "(first-fit decreasing). Position ids restart per example and attention never crosses an example "
        "boundary; the loss stays on assistant tokens. Fewer padding tokens, so more real tokens per second.",
    )
    chat_template: bool = Field(
        default=True, description="Format rows with the tokenizer's chat template (loss on assistant turns only)."
    )
    shuffle_seed: int = Field(default=0, description="Seed of the per-epoch shuffle.")
    eval_files: list[str] = Field(
        default_factory=list, description="Held-out chat rows (JSON lines or Parquet, local or s3://) whose loss is measured "
        "before training (the base model), every train.eval_every_steps and at the end.",
    )
    eval_fraction: float = Field(
        default=0.0, ge=0, lt=1, description="Hold out this fraction of the training rows (a fixed random split of the mixture) as "
        "held-out rows instead of eval_files; 0 = none.",
    )

    @model_validator(mode="after")
    def _one_eval_source(self) -> DataSection:
        if self.eval_files and self.eval_fraction:
            raise ValueError("set eval_files or eval_fraction, not both")
        if bool(self.train_files) == bool(self.sources):
            raise ValueError("give train_files (the simple form) or sources (a mixture), one of them")
        return self

    @property
    def source_list(self) -> list[DataSource]:
        """The mixture's sources: `sources`, or `train_files` as sources of weight 1."""
        return list(self.sources) or [DataSource(path=p) for p in self.train_files]


class TrainSection(Section):
    """Optimisation, schedule, held-out loss, activation checkpointing, checkpoints and fault tolerance."""

    epochs: int = Field(default=2, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(
        default=None, gt=0, description="Optimizer steps to train instead of `epochs` (the schedule spans them); "
        "data repeats in new epochs if needed.",
    )
    lr: float = Field(default=5e-5, gt=0, description="Peak AdamW learning rate.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="After the warm-up: `cosine` or `linear` decay from lr to min_lr at the "
        "last step, or `constant` at lr.",
    )
    min_lr: float = Field(default=0.0, ge=0, description="Learning rate the decay ends at (the last step's).")
    warmup_steps: int | None = Field(
        default=None, ge=0, description="Linear warm-up steps from lr/warmup_steps to lr; default: 3% of all "
        "steps (at least 1).",
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay on adapter weights.")
    micro_batch_size: int = Field(default=1, gt=0, description="Sequences per worker per forward/backward.")
    grad_accum_steps: int = Field(
        default=1, gt=0, description="Micro-batches whose gradients add up before each optimizer step: the "
        "effective batch is num_workers x micro_batch_size x grad_accum_steps sequences.",
    )
    grad_clip: float = Field(default=1.0, ge=0, description="Max gradient norm (0 = no clipping).")
    activation_checkpointing: bool = Field(
        default=True, description="Recompute each decoder layer in backward (less memory, ~30% more compute)."
    )
    forward_prefetch: Literal["explicit", "implicit"] = Field(
        default="explicit",
        description="How FSDP2 gathers the next decoder layer in forward. `explicit`: each layer prefetches the "
        "next one and every all-gather frees its buffer right after copy-out, so at most two unsharded layers "
        "exist (one fewer than implicit: 6.5 GiB per GPU on Mistral Small 4). `implicit`: FSDP2's default, which "
        "keeps the previous all-gather buffer until the next copy-out (three layer copies at the forward peak).",
    )
    eval_every_steps: int = Field(
        default=0, ge=0, description="Held-out loss (data.eval_files / eval_fraction) every N steps; 0 = at the "
        "end of each epoch. Always also before the first step (the base model) and after the last.",
    )
    checkpoint_every_steps: int = Field(
        default=0, ge=0, description="Save a resumable checkpoint every N steps; 0 = at the end of each epoch. "
        "It uploads in the background while training goes on; the last one is always waited for.",
    )
    num_checkpoints_to_keep: int = Field(default=2, gt=0, description="Resumable checkpoints kept in storage.")
    max_failures: int = Field(
        default=3, ge=0, description="Times Ray Train restarts the workers after one dies (OOM, lost node, "
        "SIGKILL); each restart resumes from the newest committed checkpoint in storage.",
    )
    seed: int = Field(default=0, description="Seed for adapter init and data order.")

    @model_validator(mode="after")
    def _min_below_peak(self) -> TrainSection:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr:g} is above lr {self.lr:g}")
        return self


class EvalSection(Section):
    """lm-eval tasks scored through Ray Data (base and tuned)."""

    tasks: list[str] = Field(
        min_length=1,
        description="lm-eval task names, e.g. nrk_quiz_qa_nob_p0; shell-style patterns such as "
        "'nrk_quiz_qa_*' are expanded against the registered tasks.",
    )
    data_dir: str | None = Field(
        default=None,
        description="Local folder laid out <hf_dataset_id>/<config>/<split>.jsonl, read instead of the hub.",
    )
    num_fewshot: int | dict[str, int] | None = Field(
        default=None, description="Few-shot examples per prompt: one count for every task; null for each task's "
        "own default (0 for NorEval); or a mapping from shell-style task patterns to counts, e.g. "
        "{'noropenbookqa_*': 16, 'norcommonsenseqa_*': 16}: the first matching pattern (in file order) sets a "
        "task's count, unmatched tasks keep their default, and a pattern that matches none of eval.tasks is an "
        "error. Tasks whose lm-eval config fixes 0-shot (nortruthfulqa_mc, nrk_quiz_qa) stay at 0, as in lm-eval. "
        "Shots from the scored split itself (norcommonsenseqa) never include the question being asked.",
    )
    apply_chat_template: bool = Field(
        default=False, description="Wrap prompts in the tokenizer's chat template, exactly as lm-eval's hf model "
        "does (with --apply_chat_template).",
    )
    chat_template_args: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for the tokenizer's chat template, e.g. "
        "{enable_thinking: false} (lm-eval's hf model_args chat_template_args). Used with apply_chat_template.",
    )
    system_instruction: str | None = Field(
        default=None, description="System message put before every prompt (lm-eval's --system_instruction). A "
        "chat template that refuses a system role (Mistral/Gemma style) gets the prompt without it, as in lm-eval: "
        "a warning says so. Without the chat template it is glued to the prompt text with no separator (lm-eval "
        "0.4.13 does that): end it with a newline.",
    )
    fewshot_as_multiturn: bool | None = Field(
        default=None, description="Few-shot examples as alternating user/assistant turns instead of one user "
        "message (lm-eval's --fewshot_as_multiturn). null: what lm-eval's CLI does, on with apply_chat_template "
        "and off without it. true needs apply_chat_template.",
    )
    batch_size: int = Field(default=16, gt=0, description="Requests per scoring batch on each eval worker.")
    num_workers: PositiveInt | Literal["auto"] = Field(
        default="auto", description="Scoring replicas (Ray Data actors), each holding a whole model. auto: on "
        "GPUs as many as the cluster holds at once (every GPU busy), on CPUs resources.num_workers.",
    )
    gpus_per_worker: PositiveInt | Literal["auto"] = Field(
        default="auto", description="GPUs per scoring replica (with resources.use_gpu), on one node. auto: the "
        "fewest that hold the model and a batch, from preflight's inference estimate. How a replica on several "
        "GPUs uses them: eval.placement.",
    )
    placement: Literal["auto", "tensor_parallel", "device_map"] = Field(
        default="auto", description="How a replica on several GPUs holds the model. tensor_parallel: "
        "transformers' tensor-parallel plan for the architecture, one process per GPU, every GPU working on every "
        "token (Mistral4: experts, embedding and lm_head split, attention replicated). device_map: the layers "
        "spread over the GPUs, one GPU working at a time. auto: tensor_parallel where transformers has a plan for "
        "the model and its sizes divide by the GPU count, else device_map. docs/evaluation.md compares them.",
    )
    limit: int | None = Field(
        default=None, gt=0, description="Score only the first N docs per task. Full evaluation is the default: "
        "subsamples gave misleading numbers in the story."
    )
    models: list[Literal["base", "tuned"]] = Field(
        default_factory=lambda: ["base", "tuned"], description="Which models `fjordtune run` evaluates."
    )
    cache: bool = Field(
        default=True, description="Store every scored batch under <storage.uri>/eval-cache/<model key>/ as it "
        "finishes and reuse stored batches: a restarted actor or a re-run scores only what is missing, and the "
        "base model (same commit, tasks, shots, template) is scored once across runs. false: score everything.",
    )
    max_restarts: int = Field(
        default=2, ge=0, le=20, description="Restarts of a scoring actor that died (OOM, a lost node); its "
        "unfinished batch is scored again. A crash that repeats more often ends the eval with the actor's error.",
    )

    @field_validator("num_fewshot", mode="before")
    @classmethod
    def _fewshot_counts(cls, v: Any) -> Any:
        def bad_count(x: Any) -> bool:
            return isinstance(x, bool) or not isinstance(x, int) or x < 0

        if v is None:
            return v
        if isinstance(v, dict):
            for pattern, count in v.items():
                if not isinstance(pattern, str) or not pattern:
                    raise ValueError(f"the mapping's keys are task-name patterns such as 'noropenbookqa_*', not "
                                     f"{pattern!r}")
                if bad_count(count):
                    raise ValueError(f"the count for {pattern!r} must be a whole number >= 0, not {count!r}")
            return v
        if bad_count(v):
            raise ValueError("expected a whole number >= 0, null (each task's default) or a mapping from task "
                             "patterns to counts such as {'noropenbookqa_*': 16}")
        return v

    @field_validator("chat_template_args")
    @classmethod
    def _not_lm_eval_own(cls, v: dict[str, Any]) -> dict[str, Any]:
        if taken := sorted(set(v) & set(LM_EVAL_CHAT_TEMPLATE_KWARGS)):
            raise ValueError(f"{', '.join(taken)}: lm-eval sets these itself when it applies the chat template")
        return v

    @field_validator("fewshot_as_multiturn")
    @classmethod
    def _multiturn_needs_template(cls, v: bool | None, info: ValidationInfo) -> bool | None:
        if v and not info.data.get("apply_chat_template"):
            raise ValueError("true needs eval.apply_chat_template: true (as in lm-eval's CLI)")
        return v

    @property
    def effective_fewshot_as_multiturn(self) -> bool:
        """`fewshot_as_multiturn` as lm-eval's CLI resolves it: unset means on exactly with the chat template."""
        return self.apply_chat_template if self.fewshot_as_multiturn is None else self.fewshot_as_multiturn


class StorageSection(Section):
    """Where models, checkpoints, adapters and reports are stored."""

    uri: str = Field(description="Where runs live: s3://bucket/prefix or a local folder.")
    endpoint_url: str | None = Field(
        default=None, description="S3 endpoint for non-AWS stores; default: the AWS_ENDPOINT_URL environment variable."
    )
    cache_dir: str | None = Field(
        default=None, description="Node-local folder where models and adapters are downloaded once per node and "
        "shared by every training rank, eval actor and retry on that node (point it at the node's scratch volume). "
        "Default: the FJORDTUNE_CACHE environment variable, else ~/.cache/fjordtune; never /tmp.",
    )
    timeout_s: float = Field(
        default=30, gt=0, description="Seconds to wait for the S3 server to accept a connection or answer one "
        "request before that attempt counts as failed (a frozen server is given up on, not waited for forever).",
    )
    retries: int = Field(
        default=5, ge=1, le=20, description="Attempts per S3 request, with exponential backoff, logged as they "
        "happen; a checkpoint commit is also retried this many times before the run stops with exit 3.",
    )
    part_size_mib: int = Field(
        default=64, ge=5, le=5120, description="Multipart transfer part size in MiB (uploads and downloads); files "
        "up to this size move in one request.",
    )
    max_concurrency: int = Field(
        default=10, ge=1, le=64, description="Parts transferred in parallel by one process.",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        if "://" in v and not v.startswith(("s3://", "file://")):
            raise ValueError(f"unsupported scheme in {v!r}: use s3:// or a local path")
        return v.rstrip("/")


class ResourcesSection(Section):
    """Workers and accelerator memory (used by the preflight check)."""

    num_workers: int = Field(default=2, gt=0, description="Training workers (one per GPU).")
    use_gpu: bool = Field(default=False, description="Train and evaluate on GPUs (NCCL) instead of CPUs (gloo).")
    cpus_per_worker: float = Field(default=1, gt=0, description="CPUs reserved per worker.")
    gpus_per_node: int = Field(
        default=8, gt=0, description="GPUs on one node (one Ray node: a pod or a machine). Preflight checks that the "
        "training ranks and every eval actor can be placed on nodes of this size; 8 for H100/H200 nodes.",
    )
    accelerator_memory_gib: float = Field(
        default=79.6, gt=0, description="Memory of one accelerator in GiB, for the preflight check (an H100 "
        "80 GB reports 81,559 MiB = 79.6 GiB; H200: 139.8).",
    )
    memory_headroom: float = Field(
        default=0.1, ge=0, lt=1, description="Fraction of accelerator memory preflight keeps free."
    )


class TelemetrySection(Section):
    """GPU telemetry (NVML) and Ray metrics."""

    nvml: bool = Field(default=True, description="Sample GPU utilisation, memory, power and temperature with NVML "
                       "in every training worker and eval replica (skipped where NVML finds no GPU).")
    interval_s: float = Field(default=1.0, gt=0, description="Seconds between samples (and metric updates).")
    ray_metrics: bool = Field(default=True, description="Export samples and training/eval figures as Ray metrics "
                              "(Prometheus, `ray_fjordtune_*`); the end-of-run summary is kept either way.")
    idle_warning_s: float = Field(default=60.0, gt=0, description="Warn in the summary when a GPU stays below 10% "
                                  "utilisation this many seconds in a row while training or scoring.")
    peak_tflops: float | None = Field(default=None, gt=0, description="Peak BF16 TFLOP/s of one GPU, for the MFU "
                                      "estimate; default: by NVML device name (H100/H200 SXM 989, A100 312), none on "
                                      "CPU.")


class SubmitSection(Section):
    """How `fjordtune submit` sends the job to a Ray cluster."""

    address: str | None = Field(
        default=None, description="Ray job server (dashboard) address, http://host:8265; default: "
        "RAY_API_SERVER_ADDRESS, or RAY_ADDRESS when it is an http:// URL."
    )
    working_dir: str = Field(default=".", description="Uploaded as the job's working directory.")
    excludes: list[str] = Field(
        default_factory=lambda: [".git", ".venv", "outputs", "**/__pycache__", "*.egg-info"],
        description="Paths left out of the upload.",
    )
    pip: list[str] = Field(default_factory=list, description="Extra pip packages for the job's runtime_env.")
    env_vars: dict[str, str] = Field(
        default_factory=dict, description="Environment variables for the job (they travel in Ray's runtime_env and "
        "show in the dashboard: credentials are refused here; they come from the cluster's environment).",
    )

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("the job server address is the dashboard's http:// URL, e.g. http://HEAD:8265 "
                             "(not the GCS address HEAD:6379)")
        return v


class JobSpec(Section):
    """A fjordtune job file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Run name; storage path <uri>/<name>.")
    model: ModelSection
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection
    storage: StorageSection
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    telemetry: TelemetrySection = Field(default_factory=TelemetrySection)
    submit: SubmitSection = Field(default_factory=SubmitSection)

    @property
    def run_uri(self) -> str:
        return f"{self.storage.uri}/{self.name}"
