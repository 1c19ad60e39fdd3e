"""An lm-eval model whose scoring runs as a Ray Data pipeline over a pool of scorer actors.

lm-eval builds the requests (prompts, few-shot, chat template) exactly as it does for `hf`; we only
replace where the forward passes run. Every request carries its index through the pipeline, so the
result order never depends on Ray Data's ordering.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections import Counter
from typing import Any

from lm_eval.api.model import TemplateLM

from fjordtune.errors import FjordtuneError, InfraError, UserError, reraise_as_fjordtune
from fjordtune.eval.encode import PairEncoder
from fjordtune.preflight.placement import ClusterShape, NodeGroup, place_eval

log = logging.getLogger(__name__)

ACTOR_START_TIMEOUT_S = 3600.0
"""How long Ray Data may take to start the scoring actors: being placed, then `ScoreActor.__init__`,
which downloads the model into the node-local cache and loads it (minutes for a 119B model). Without a
bound, an actor that is never placed (its GPUs held by something else) makes the eval wait forever."""


class ScoreActor:
    """One Ray Data actor: loads the model once (adapter merged), then scores work units: one unit per
    call, tokenized here (`eval/encode.py`), its result written to storage as soon as it is scored
    (`eval/units.py`)."""

    def __init__(self, *, model_uri: str, adapter_uri: str | None, dtype: str, use_gpu: bool, tokenizer: Any,
                 storage: dict[str, Any] | None = None, cache_dir: str | None = None,
                 results: dict[str, Any] | None = None, tensor_parallel: int = 1,
                 telemetry: dict[str, Any] | None = None) -> None:
        import torch

        from fjordtune.eval.scorer import Scorer
        from fjordtune.eval.units import ResultStore
        from fjordtune.model.load import local_model_dir
        from fjordtune.storage import Store, cache_root

        # the tokenizer's Rust threads: as many as the actor's CPUs (Ray sets torch's threads to them),
        # not one per core of the node, which every replica on it would otherwise start
        os.environ.setdefault("RAYON_NUM_THREADS", str(torch.get_num_threads()))
        self.error: FjordtuneError | None = None
        self.monitor = _replica_monitor(telemetry, use_gpu=use_gpu)  # from the start: loading is its setup phase
        self.encoder = PairEncoder(tokenizer)  # the driver's own tokenizer object: the same ids as lm-eval's
        try:
            store = Store(**(storage or {}))  # plain settings: credentials come from the actor's environment
            self.results = ResultStore.from_settings(store, results) if results else None
            cache = cache_root(cache_dir)  # one download per node, shared with the training ranks
            model_dir = local_model_dir(model_uri, store=store, cache_root=cache)
            adapter_dir = local_model_dir(adapter_uri, store=store, cache_root=cache) if adapter_uri else None
            device = "cuda" if use_gpu else "cpu"
            if tensor_parallel > 1:  # this process is rank 0; the other ranks are its children, on its GPUs
                from fjordtune.eval.tp import TPReplica

                self.scorer = TPReplica(model_dir, world=tensor_parallel, dtype=dtype, device=device,
                                        adapter_dir=adapter_dir, threads_per_rank=None if use_gpu else 1)
            else:
                self.scorer = Scorer(model_dir, adapter_dir=adapter_dir, dtype=dtype, device=device)
        except FjordtuneError as e:
            # Ray reports an exception from an actor's __init__ only as text (ActorDiedError): raise it
            # from the first batch instead, where it travels as itself and reaches the user as such
            self.error = e
        self.ready_at = time.time()
        if self.monitor is not None:
            self.monitor.phase("score")

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from fjordtune.eval.units import Unit, UnitResult, token_counts

        if self.error is not None:
            raise self.error
        out: dict[str, list[Any]] = {"unit": [], "logprob": [], "greedy": [], "scored": [], "pid": [], "ranks": [],
                                     "tokens_full": [], "tokens_shared": [], "ready_at": []}
        for key, payload in zip(batch["unit"], batch["requests"], strict=True):
            # a retried unit (its actor died after storing it, before returning it) is read, not scored
            got = self.results.read(str(key)) if self.results else None
            scored = got is None
            if got is None:
                pairs = self.encoder.encode_pairs(Unit.requests_of(str(payload)))
                ctx, cont = [p[0] for p in pairs], [p[1] for p in pairs]
                got = UnitResult(self.scorer.score(ctx, cont), token_counts(pairs))
                if self.results:
                    self.results.write(str(key), got)
            out["unit"].append(str(key))
            out["logprob"].append(json.dumps([g[0] for g in got.results]))
            out["greedy"].append(json.dumps([g[1] for g in got.results]))
            out["tokens_full"].append(got.tokens[0])
            out["tokens_shared"].append(got.tokens[1])
            out["ready_at"].append(self.ready_at)
            out["scored"].append(scored)
            out["pid"].append(os.getpid())
            out["ranks"].append(getattr(self.scorer, "world", 1))  # processes that scored it (tensor parallel)
            if self.monitor is not None and scored:
                self.monitor.items(len(got.results))
        if self.monitor is not None:
            self.monitor.notify()  # before the unit goes back: the board counts it when the driver asks
        return out


class RayDataLM(TemplateLM):
    """lm-eval `TemplateLM` scored through Ray Data (multiple-choice log-likelihood tasks)."""

    def __init__(self, *, model_uri: str, tokenizer: Any, adapter_uri: str | None = None, dtype: str = "float32",
                 num_workers: int = 2, batch_size: int = 16, use_gpu: bool = False, cpus_per_worker: float = 1,
                 storage: dict[str, Any] | None = None, name: str = "model", gpus_per_worker: int = 1,
                 cache_dir: str | None = None,
                 actor_start_timeout_s: float = ACTOR_START_TIMEOUT_S,
                 chat_template_args: dict[str, Any] | None = None, results: Any = None,
                 max_restarts: int = 2, fill_cluster: bool = False, tensor_parallel: int = 1,
                 telemetry: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.model_uri, self.adapter_uri, self.dtype = model_uri, adapter_uri, dtype
        self.num_workers, self.batch_size, self.use_gpu = num_workers, batch_size, use_gpu
        self.cpus_per_worker, self.storage, self.name = cpus_per_worker, storage, name
        self.cache_dir = cache_dir
        self.gpus_per_worker = gpus_per_worker
        self.actor_start_timeout_s = actor_start_timeout_s
        self.results = results
        """`eval.units.ResultStore` where unit results are stored and found again; None: nothing stored."""
        self.max_restarts = max_restarts
        self.fill_cluster = fill_cluster
        """Start as many replicas as the live cluster holds at once (`eval.num_workers: auto` on GPUs)."""
        self.tensor_parallel = tensor_parallel
        """Ranks of one tensor-parallel replica (1: one process per replica; `eval.tp.replica_placement`)."""
        self.replica_ranks: Counter[int] = Counter()
        """Units by the number of processes of the replica that returned them (tensor parallel: > 1)."""
        self.num_scored = self.num_reused = self.units_reused = 0
        self.scored_units: list[str] = []
        """Keys of the units scored by this process's evaluations, one entry per scoring (tests count them)."""
        self.reused_units: list[str] = []
        """Keys of the units whose stored results were used instead (found before scoring started, or by an
        actor retrying a unit that a killed actor had already stored)."""
        self.tokens_full = self.tokens_shared = 0
        """Tokens full-sequence scoring would forward, and what shared contexts forward instead."""
        self.encoder = PairEncoder(tokenizer) if tokenizer is not None else None
        self.chat_template_args = dict(chat_template_args or {})  # to the tokenizer's template, as hf's
        self._early: _EarlyStart | None = None
        self.asked_at: float | None = None
        """When lm-eval first asked for scores (time.time()); with `start_early`, replicas were loading before."""
        self.first_ready_at: float | None = None
        """When the first replica that returned a unit had finished loading (time.time())."""
        self.telemetry = telemetry
        """Monitor settings for the replicas (`telemetry_settings`); None: no telemetry."""
        self._telemetry_board: Any = None

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.encoder.prefix_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.encoder.encode([string], add_special_tokens)[0]

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) of each request's continuation. The driver only groups the text
        into units; each actor tokenizes the units it scores exactly as lm-eval's own
        `TemplateLM.loglikelihood` would (`eval.encode.PairEncoder`), in parallel over the replicas."""
        return self.score_pairs([tuple(r.args) for r in requests])

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from fjordtune.eval.chat import render_chat

        # hf's rendering, its retry without the system role included (fjordtune.eval.chat)
        return render_chat(self.tokenizer, chat_history, add_generation_prompt=add_generation_prompt,
                           chat_template_args=self.chat_template_args)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return super().chat_template(chat_template)  # TemplateLM's selection, the one `hf` inherits

    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        raise NotImplementedError("RayDataLM scores text pairs (loglikelihood, score_pairs): the actors tokenize")

    def score_pairs(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """Score (context, continuation) text pairs: plan units, reuse stored ones, score the rest."""
        from fjordtune.eval.units import plan_units

        if self.asked_at is None:
            self.asked_at = time.time()
        if not pairs:
            return []
        units = plan_units(pairs, self.batch_size)
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        reused: dict[str, Any] = {}
        if self.results is not None:
            self.results.describe()
            done = self.results.finished() & {u.key for u in units}
            reused = self.results.read_many(done)
        todo = []
        for unit in units:
            if unit.key in reused:
                self._place(out, unit, reused[unit.key].results)
                self.tokens_full += reused[unit.key].tokens[0]
                self.tokens_shared += reused[unit.key].tokens[1]
            else:
                todo.append(unit)
        num_reused = sum(len(u.indices) for u in units if u.key in reused)
        self.num_reused += num_reused
        self.units_reused += len(units) - len(todo)
        self.reused_units.extend(u.key for u in units if u.key in reused)
        log.info("%s: %d requests in %d units%s", self.name, len(pairs), len(units),
                 f"; {num_reused} reused from {self.results.uri}" if num_reused else "")
        if todo:
            self._score_units(todo, out)
        self.close()  # replicas started early and given nothing (every unit was stored): let them go
        missing = [i for i, r in enumerate(out) if r is None]
        if missing:
            raise RuntimeError(f"{len(missing)} requests came back unscored (first: {missing[:5]})")
        log.info("%s: a context forwarded once: %s of the tokens of full scoring", self.name,
                 f"{self.tokens_shared / max(self.tokens_full, 1):.0%}")
        return out  # type: ignore[return-value]

    @staticmethod
    def _place(out: list[tuple[float, bool] | None], unit: Any, results: list[tuple[float, bool]]) -> None:
        if len(results) != len(unit.indices):
            raise RuntimeError(f"unit {unit.key}: {len(results)} results for {len(unit.indices)} requests")
        for i, r in zip(unit.indices, results, strict=True):
            out[i] = r

    def start_early(self) -> bool:
        """Start the scoring replicas now, before lm-eval builds its requests, so that they load the model
        while the driver builds prompts (at 119B: minutes of loading against a minute of prompts). The
        pipeline waits for its units on a board actor (`_UnitBoard`); `score_pairs` posts them.

        Only when nothing is stored for this model yet (a cold run): where stored units may cover the
        run, the units are planned first and replicas start only for what is missing (a re-run whose
        base results are all cached loads no model). Returns whether the replicas were started."""
        import ray

        if self._early is not None:
            return True
        if self.results is not None and self.results.finished():
            return False
        num_actors = self.placeable_actors(ray.nodes())  # an impossible actor: the user's error, at once
        self._early = _EarlyStart(self, num_actors)
        log.info("%s: starting %d scoring replicas while lm-eval builds its requests", self.name, num_actors)
        return True

    def close(self) -> None:
        """End an early start that will get no units (nothing to score, or the eval failed before)."""
        early, self._early = self._early, None
        if early is not None:
            early.close()

    def _score_units(self, units: list[Any], out: list[tuple[float, bool] | None]) -> None:
        import ray

        by_key = {u.key: u for u in units}
        early, self._early = self._early, None
        num_actors = early.num_actors if early else min(self.placeable_actors(ray.nodes()), len(units))
        log.info("%s: scoring %d units on %d Ray Data actors (up to %d restarts each)", self.name, len(units),
                 num_actors, self.max_restarts)
        restore = early.restore if early else _data_context(self.actor_start_timeout_s)
        t = self.telemetry or {}
        progress = EvalProgress(self.name, total=sum(len(u.indices) for u in units),
                                tags={"ray_job": t.get("job") or "-", "run": t.get("run") or "-"})
        timed_out = False
        try:
            if early:
                rows = early.rows(units)
            else:
                with warnings.catch_warnings():  # max_restarts/max_task_retries have no named parameter yet
                    warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
                    rows = self._pipeline(ray.data.from_items(_unit_rows(units)), num_actors=num_actors).iter_rows()
            for row in rows:
                unit = by_key[str(row["unit"])]
                ready = float(row["ready_at"])
                self.first_ready_at = ready if self.first_ready_at is None else min(self.first_ready_at, ready)
                got = [(float(lp), bool(g)) for lp, g in zip(json.loads(row["logprob"]), json.loads(row["greedy"]),
                                                              strict=True)]
                self._place(out, unit, got)
                self.tokens_full += int(row["tokens_full"])
                self.tokens_shared += int(row["tokens_shared"])
                if row["scored"]:
                    self.num_scored += len(unit.indices)
                    self.scored_units.append(unit.key)
                else:
                    self.num_reused += len(unit.indices)
                    self.units_reused += 1
                    self.reused_units.append(unit.key)
                self.replica_ranks[int(row["ranks"])] += 1
                progress.update(len(unit.indices))
        except Exception as e:  # a bad model folder on an actor is the user's error, not a crash
            reraise_as_fjordtune(e)
            cause = _actor_died(e)
            if cause is not None:
                kept = ("were scored and stored: the next run scores only the rest" if self.results is not None
                        else "were scored, none stored (eval.cache is off)")
                raise InfraError(
                    f"eval {self.name}: a scoring actor died {self.max_restarts + 1} times, the last time with: "
                    f"{cause}; {progress.done} of {progress.total} requests {kept} "
                    "(eval.max_restarts sets the restarts)") from None
            if not _actor_start_timed_out(e):
                raise
            timed_out = True
        finally:
            restore()
            progress.close()
        if timed_out:
            # Ray Data leaves the actor it waited for pending; once placed, it starts and exits (its handle
            # is gone). When this ends the driver (`fjordtune run`), it goes with the driver's job.
            raise InfraError(
                f"eval: {num_actors} scoring actor(s) ({self._actor_needs()} each) did not start within "
                f"{self.actor_start_timeout_s:g} s: their resources are held by other work (a training run "
                "still releasing its GPUs, another job), or loading the model took longer than that")

    def _actor_needs(self) -> str:
        gpus = f"{self.gpus_per_worker} GPU(s) and " if self.use_gpu else ""
        return f"{gpus}{self.cpus_per_worker:g} CPU(s)"

    def placeable_actors(self, nodes: list[dict[str, Any]]) -> int:
        """How many scoring actors the cluster's alive nodes (`ray.nodes()`) hold at once, at most
        `num_workers`; raise `UserError` when not even one fits on any node (Ray Data would wait for
        it forever)."""
        alive = [n.get("Resources") or {} for n in nodes if n.get("Alive")]
        shape = ClusterShape(source="the connected Ray cluster", groups=tuple(
            NodeGroup(name=f"node {i}", gpus=int(r.get("GPU", 0)), cpus=float(r.get("CPU", 0)), num_nodes=1)
            for i, r in enumerate(alive)))
        # filling the cluster: every replica its GPUs hold at once (a GPU count is the bound, never CPUs alone)
        wanted = max(self.num_workers, sum(int(r.get("GPU", 0)) for r in alive)) if self.fill_cluster \
            else self.num_workers
        placed = place_eval(shape, num_actors=wanted, gpus_per_actor=self.gpus_per_worker if self.use_gpu
                            else 0, cpus_per_actor=self.cpus_per_worker)
        if not placed.fits:
            seen = Counter((r.get("CPU", 0), r.get("GPU", 0)) for r in alive)
            have = ", ".join(f"{n} x ({c:g} CPUs, {g:g} GPUs)" for (c, g), n in sorted(seen.items())) or "none"
            raise UserError(
                f"eval: a scoring actor needs {self._actor_needs()} on one node, but no alive node of the "
                f"connected Ray cluster has them (nodes: {have}); it holds the whole model and cannot span "
                "nodes: use nodes with enough GPUs and CPUs, or lower eval.gpus_per_worker / "
                "resources.cpus_per_worker (`fjordtune preflight JOB --cluster FILE` checks this before submitting)")
        if placed.concurrent < self.num_workers and not self.fill_cluster:
            log.warning("%s: eval.num_workers=%d scoring actors requested, but the cluster holds %d at once "
                        "(%s each): starting %d", self.name, self.num_workers, placed.concurrent,
                        self._actor_needs(), placed.concurrent)
        return placed.concurrent

    def _pipeline(self, ds: Any, *, num_actors: int | None = None) -> Any:
        from ray.data import ActorPoolStrategy

        return ds.map_batches(
            ScoreActor,
            fn_constructor_kwargs={
                "model_uri": self.model_uri, "adapter_uri": self.adapter_uri, "dtype": self.dtype,
                "use_gpu": self.use_gpu, "storage": self.storage, "cache_dir": self.cache_dir,
                "tokenizer": self.tokenizer,
                "results": self.results.settings() if self.results else None,
                "tensor_parallel": self.tensor_parallel,
                "telemetry": self._replica_telemetry(),
            },
            batch_size=1,  # one unit per call: a unit is already a batch of requests
            batch_format="numpy",
            compute=ActorPoolStrategy(size=num_actors or self.num_workers),
            num_gpus=self.gpus_per_worker if self.use_gpu else 0,
            num_cpus=self.cpus_per_worker,
            # Ray Data restarts and retries forever by default, so a crash that repeats (OOM, a bad
            # driver) would hang the eval: a bounded number of restarts, then the actor's death cause.
            # A restarted actor gets the unit it lost again; finished units are not redone.
            max_restarts=self.max_restarts,
            max_task_retries=self.max_restarts,
        )

    def _replica_telemetry(self) -> dict[str, Any] | None:
        """The replicas' monitor settings and the board they leave their summaries on (made once)."""
        import ray

        if self.telemetry is None:
            return None
        if self._telemetry_board is None:
            self._telemetry_board = ray.remote(num_cpus=0)(TelemetryBoard).remote()
        return {**self.telemetry, "board": self._telemetry_board}

    def telemetry_summary(self, wait_s: float = 10.0) -> dict[str, Any] | None:
        """Every replica's telemetry summary. A replica hands it over after each unit, before returning the
        unit, but over its own connection: wait (at most `wait_s`) until the board has counted every
        request this process saw scored."""
        import ray

        from fjordtune.telemetry.summary import combine

        if self._telemetry_board is None:
            return None
        deadline = time.monotonic() + wait_s
        while True:
            try:
                procs = ray.get(self._telemetry_board.summaries.remote(), timeout=30)
            except Exception as e:  # noqa: BLE001 (a report, never a reason to fail a finished eval)
                log.warning("%s: no telemetry summary from the replicas: %s", self.name, e)
                return None
            if sum(p.get("items_done", 0) for p in procs) >= self.num_scored or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return combine(procs, role="eval") if procs else None

    def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("fjordtune's Ray Data scorer supports multiple-choice (loglikelihood) tasks only")

    def generate_until(self, requests: Any, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("fjordtune's Ray Data scorer supports multiple-choice (loglikelihood) tasks only")


class TelemetryBoard:
    """A small actor of the driver's: numbers the scoring replicas (their `rank` tag) and keeps each one's
    latest telemetry summary, which the replica's monitor leaves here at every sample."""

    def __init__(self) -> None:
        self.procs: dict[int, dict[str, Any]] = {}
        self.next = 0

    def register(self) -> int:
        self.next += 1
        return self.next - 1

    def post(self, index: int, summary: dict[str, Any]) -> None:
        self.procs[index] = summary

    def summaries(self) -> list[dict[str, Any]]:
        return [self.procs[i] for i in sorted(self.procs)]


def _replica_monitor(settings: dict[str, Any] | None, *, use_gpu: bool) -> Any:
    """A started `Monitor` for a scoring replica, or None without telemetry settings."""
    if not settings:
        return None
    import ray

    from fjordtune.telemetry.gpu import open_sampler
    from fjordtune.telemetry.monitor import Monitor

    board = settings["board"]
    index = ray.get(board.register.remote(), timeout=60)
    peak = None
    if use_gpu:
        import torch

        peak = lambda: max((torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())),  # noqa: E731
                           default=0)
    return Monitor(role="eval", rank=index, run=settings["run"], job=settings.get("job", ""),
                   sampler=open_sampler() if settings.get("nvml", True) else None,
                   interval_s=settings.get("interval_s", 1.0), export=settings.get("export", True),
                   idle_warning_s=settings.get("idle_warning_s", 60.0), process_peak=peak,
                   on_sample=lambda m: board.post.remote(index, m.summary())).start()


def _data_context(actor_start_timeout_s: float) -> Any:
    """Set Ray Data's context for a scoring pipeline; returns the function that restores it."""
    import ray

    context = ray.data.DataContext.get_current()
    # the scorer's own errors (a model folder with missing weights) must arrive as themselves
    previous = (context.raise_original_map_exception, context.wait_for_min_actors_s)
    context.raise_original_map_exception = True
    # Ray Data waits for its actors without limit by default: bound it (whole seconds, an int field)
    context.wait_for_min_actors_s = max(1, math.ceil(actor_start_timeout_s))

    def restore() -> None:
        context.raise_original_map_exception, context.wait_for_min_actors_s = previous

    return restore


def _unit_rows(units: list[Any]) -> list[dict[str, str]]:
    """A scoring pipeline's input rows: each unit's key and its requests (`Unit.payload`)."""
    return [{"unit": u.key, "requests": u.payload()} for u in units]


class _UnitBoard:
    """A Ray actor (no CPU) where the driver posts the units of an early-started pipeline, in shards;
    each shard's fetch waits until they are posted."""

    def __init__(self) -> None:
        import asyncio

        self.shards: list[list[dict[str, str]]] | None = None
        self.posted = asyncio.Event()

    async def post(self, shards: list[list[dict[str, str]]]) -> None:
        self.shards = shards
        self.posted.set()

    async def shard(self, index: int) -> list[dict[str, str]]:
        await self.posted.wait()
        return self.shards[index] if self.shards and index < len(self.shards) else []


def _fetch_shard(row: dict[str, Any], board: Any) -> list[dict[str, str]]:
    import ray

    return ray.get(board.shard.remote(int(row["id"])))


class _EarlyStart:
    """A scoring pipeline started before its units exist (`RayDataLM.start_early`): Ray Data starts the
    replicas at once; its input is `SHARDS` shards fetched, one at a time, from a `_UnitBoard`. A thread
    drains the pipeline into a queue from the start, which is what makes Ray Data execute it."""

    SHARDS_PER_ACTOR = 16
    """Shards (Ray Data blocks) per replica: enough that the replicas finish within a shard of each other."""

    def __init__(self, lm: RayDataLM, num_actors: int) -> None:
        import queue
        import threading

        import ray

        self.num_actors = num_actors
        self.shards = max(64, self.SHARDS_PER_ACTOR * num_actors)
        self.board = ray.remote(num_cpus=0)(_UnitBoard).remote()
        self.restore = _data_context(lm.actor_start_timeout_s)
        self.posted = False
        with warnings.catch_warnings():  # max_restarts/max_task_retries have no named parameter yet
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            # from_items, not range: a read task would need a CPU, which the replicas hold while they wait
            source = ray.data.from_items([{"id": i} for i in range(self.shards)], override_num_blocks=self.shards)
            source = source.flat_map(_fetch_shard, fn_kwargs={"board": self.board}, num_cpus=0, concurrency=1)
            self.dataset = lm._pipeline(source, num_actors=num_actors)
        self.queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.thread = threading.Thread(target=self._drain, name=f"fjordtune-{lm.name}-rows", daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        try:
            for row in self.dataset.iter_rows():
                self.queue.put(("row", row))
            self.queue.put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the driver's thread, which raises it
            self.queue.put(("error", e))

    def _post(self, units: list[Any]) -> None:
        import ray

        items = _unit_rows(units)
        n = len(items)
        # contiguous shards keep the units' longest-first order
        ray.get(self.board.post.remote([items[i * n // self.shards:(i + 1) * n // self.shards]
                                        for i in range(self.shards)]))
        self.posted = True

    def rows(self, units: list[Any]) -> Any:
        """Post the units, then yield the pipeline's rows as they come; its error, raised here."""
        self._post(units)
        while True:
            kind, value = self.queue.get()
            if kind == "row":
                yield value
            elif kind == "error":
                raise value
            else:
                return

    def close(self) -> None:
        """No units for this pipeline: post none, so that it ends (its replicas exit with it)."""
        if not self.posted:
            try:
                self._post([])
            finally:
                self.restore()
        self.thread.join(timeout=60)


def _actor_start_timed_out(exc: BaseException) -> bool:
    """Whether Ray Data gave up waiting for its actors (`wait_for_min_actors_s`), wrapped or not."""
    from ray.exceptions import GetTimeoutError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, GetTimeoutError) or "Timed out while starting actors" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _actor_died(exc: BaseException) -> str | None:
    """The death cause of a scoring actor that died for good (restarts exhausted), wrapped or not; None
    for other errors."""
    import re

    from ray.exceptions import ActorDiedError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ActorDiedError) or "The actor died unexpectedly" in str(exc):
            text = " ".join(str(exc).split())
            m = re.search(r"Worker exit detail: (.*?)(?: Some common causes|$)", text)
            return (m[1] if m else text[:300]).strip()
        exc = exc.__cause__ or exc.__context__
    return None


class EvalProgress:
    """Requests scored, rate and ETA: a log line every `every_s` seconds (and at the end), and Ray
    metrics for the dashboard (`fjordtune_eval_requests_done`, `_total`, `_eta_seconds`)."""

    def __init__(self, label: str, *, total: int, every_s: float = 10.0, tags: dict[str, str] | None = None) -> None:
        self.label, self.total, self.every_s = label, total, every_s
        self.tags = {"ray_job": "-", "run": "-", **(tags or {}), "model": label}
        self.done = 0
        self.start = self.last = time.monotonic()
        self.gauges: dict[str, Any] = {}
        try:
            from ray.util.metrics import Gauge

            for name, desc in (("requests_done", "eval requests scored so far"),
                               ("requests_total", "eval requests to score"),
                               ("eta_seconds", "estimated seconds until the eval is scored")):
                self.gauges[name] = Gauge(f"fjordtune_eval_{name}", description=desc, tag_keys=("ray_job", "run", "model"))
        except Exception as e:  # noqa: BLE001 (metrics are a convenience; never fail an eval on them)
            log.debug("no Ray metrics for eval progress: %s", e)
        self._publish(eta=None)

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            self._report(now)

    def _report(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else None
        log.info("%s: %d/%d requests (%.1f%%), %.1f requests/s, %s", self.label, self.done, self.total,
                 100 * self.done / max(self.total, 1), rate,
                 "done" if self.done >= self.total else f"ETA {_duration(eta)}")
        self._publish(eta=eta)

    def _publish(self, *, eta: float | None) -> None:
        tags = self.tags
        for name, value in (("requests_done", self.done), ("requests_total", self.total),
                            ("eta_seconds", eta if eta is not None else -1)):
            if name in self.gauges:
                self.gauges[name].set(float(value), tags=tags)

    def close(self) -> None:
        if self.done < self.total:
            self._publish(eta=None)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
