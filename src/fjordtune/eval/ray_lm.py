"""An lm-eval model whose scoring runs as a Ray Data pipeline over a pool of scorer actors.

lm-eval builds the requests (prompts, few-shot, chat template) exactly as it does for `hf`; we only
replace where the forward passes run. Every request carries its index through the pipeline, so the
result order never depends on Ray Data's ordering.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from typing import Any

from lm_eval.api.model import TemplateLM

from fjordtune.errors import FjordtuneError, InfraError, UserError, reraise_as_fjordtune
from fjordtune.preflight.placement import ClusterShape, NodeGroup, place_eval

log = logging.getLogger(__name__)

ACTOR_START_TIMEOUT_S = 3600.0
"""How long Ray Data may take to start the scoring actors: being placed, then `ScoreActor.__init__`,
which downloads the model into the node-local cache and loads it (minutes for a 119B model). Without a
bound, an actor that is never placed (its GPUs held by something else) makes the eval wait forever."""


class ScoreActor:
    """One Ray Data actor: loads the model once, then scores batches of requests."""

    def __init__(self, *, model_uri: str, adapter_uri: str | None, dtype: str, use_gpu: bool,
                 storage: dict[str, Any] | None = None, cache_dir: str | None = None) -> None:
        from fjordtune.eval.scorer import Scorer
        from fjordtune.model.load import local_model_dir
        from fjordtune.storage import Store, cache_root

        self.error: FjordtuneError | None = None
        try:
            store = Store(**(storage or {}))  # plain settings: credentials come from the actor's environment
            cache = cache_root(cache_dir)  # one download per node, shared with the training ranks
            model_dir = local_model_dir(model_uri, store=store, cache_root=cache)
            adapter_dir = local_model_dir(adapter_uri, store=store, cache_root=cache) if adapter_uri else None
            self.scorer = Scorer(model_dir, adapter_dir=adapter_dir, dtype=dtype, device="cuda" if use_gpu else "cpu")
        except FjordtuneError as e:
            # Ray reports an exception from an actor's __init__ only as text (ActorDiedError): raise it
            # from the first batch instead, where it travels as itself and reaches the user as such
            self.error = e

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        ctx = [list(map(int, x)) for x in batch["ctx"]]
        cont = [list(map(int, x)) for x in batch["cont"]]
        scored = self.scorer.score(ctx, cont)
        return {"idx": batch["idx"], "logprob": [s[0] for s in scored], "greedy": [s[1] for s in scored]}


class RayDataLM(TemplateLM):
    """lm-eval `TemplateLM` scored through Ray Data (multiple-choice log-likelihood tasks)."""

    def __init__(self, *, model_uri: str, tokenizer: Any, adapter_uri: str | None = None, dtype: str = "float32",
                 num_workers: int = 2, batch_size: int = 16, use_gpu: bool = False, cpus_per_worker: float = 1,
                 storage: dict[str, Any] | None = None, name: str = "model", gpus_per_worker: int = 1,
                 cache_dir: str | None = None,
                 actor_start_timeout_s: float = ACTOR_START_TIMEOUT_S) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.model_uri, self.adapter_uri, self.dtype = model_uri, adapter_uri, dtype
        self.num_workers, self.batch_size, self.use_gpu = num_workers, batch_size, use_gpu
        self.cpus_per_worker, self.storage, self.name = cpus_per_worker, storage, name
        self.cache_dir = cache_dir
        self.gpus_per_worker = gpus_per_worker
        self.actor_start_timeout_s = actor_start_timeout_s
        self.num_scored = 0

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            kw["add_special_tokens"] = False
        return self.tokenizer.encode(string, **kw)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        import ray

        if not requests:
            return []
        items = [{"idx": i, "ctx": ctx, "cont": cont} for i, (_, ctx, cont) in enumerate(requests)]
        # longest first: batches of similar length waste less padding
        items.sort(key=lambda r: -(len(r["ctx"]) + len(r["cont"])))
        num_actors = self.placeable_actors(ray.nodes())
        log.info("%s: scoring %d requests on %d Ray Data actors", self.name, len(items), num_actors)
        context = ray.data.DataContext.get_current()
        # the scorer's own errors (a model folder with missing weights) must arrive as themselves
        context.raise_original_map_exception = True
        # Ray Data waits for its actors without limit by default: bound it (whole seconds, an int field)
        previous_wait = context.wait_for_min_actors_s
        context.wait_for_min_actors_s = max(1, math.ceil(self.actor_start_timeout_s))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        timed_out = False
        try:
            with warnings.catch_warnings():  # max_restarts/max_task_retries have no named parameter yet
                warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
                ds = self._pipeline(ray.data.from_items(items), num_actors=num_actors)
            for row in ds.iter_rows():
                out[int(row["idx"])] = (float(row["logprob"]), bool(row["greedy"]))
        except Exception as e:  # a bad model folder on an actor is the user's error, not a crash
            reraise_as_fjordtune(e)
            if not _actor_start_timed_out(e):
                raise
            timed_out = True
        finally:
            context.wait_for_min_actors_s = previous_wait
        if timed_out:
            # Ray Data leaves the actor it waited for pending; once placed, it starts and exits (its handle
            # is gone). When this ends the driver (`fjordtune run`), it goes with the driver's job.
            raise InfraError(
                f"eval: {num_actors} scoring actor(s) ({self._actor_needs()} each) did not start within "
                f"{self.actor_start_timeout_s:g} s: their resources are held by other work (a training run "
                "still releasing its GPUs, another job), or loading the model took longer than that")
        missing = [i for i, r in enumerate(out) if r is None]
        if missing:
            raise RuntimeError(f"{len(missing)} requests came back unscored (first: {missing[:5]})")
        self.num_scored += len(requests)
        return out  # type: ignore[return-value]

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
        placed = place_eval(shape, num_actors=self.num_workers, gpus_per_actor=self.gpus_per_worker if self.use_gpu
                            else 0, cpus_per_actor=self.cpus_per_worker)
        if not placed.fits:
            seen = Counter((r.get("CPU", 0), r.get("GPU", 0)) for r in alive)
            have = ", ".join(f"{n} x ({c:g} CPUs, {g:g} GPUs)" for (c, g), n in sorted(seen.items())) or "none"
            raise UserError(
                f"eval: a scoring actor needs {self._actor_needs()} on one node, but no alive node of the "
                f"connected Ray cluster has them (nodes: {have}); it holds the whole model and cannot span "
                "nodes: use nodes with enough GPUs and CPUs, or lower eval.gpus_per_worker / "
                "resources.cpus_per_worker (`fjordtune preflight JOB --cluster FILE` checks this before submitting)")
        if placed.concurrent < self.num_workers:
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
            },
            batch_size=self.batch_size,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=num_actors or self.num_workers),
            num_gpus=self.gpus_per_worker if self.use_gpu else 0,
            num_cpus=self.cpus_per_worker,
            # Ray Data restarts and retries forever by default, so a crash that repeats (a bad model
            # folder, OOM) would hang the eval: fail fast and say why instead
            max_restarts=0,
            max_task_retries=0,
        )

    def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("fjordtune's Ray Data scorer supports multiple-choice (loglikelihood) tasks only")

    def generate_until(self, requests: Any, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("fjordtune's Ray Data scorer supports multiple-choice (loglikelihood) tasks only")


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
