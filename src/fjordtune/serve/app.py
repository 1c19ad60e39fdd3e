"""`fjordtune serve JOB`: the tuned model behind an OpenAI-compatible API, as a Ray Serve application.

Two engines, one API (`/v1/chat/completions`, streaming or not, and `/v1/models`):

- `transformers` (CPU, and single-device GPU): a Serve deployment with a FastAPI ingress around
  `ChatEngine` (`serve/engine.py`). Its replica loads the model itself, where it runs: the run's adapter
  merged into the base a block of rows at a time (`export/merged.py`, the same code as `fjordtune
  export`), or a merged folder (`--merged`). The model is downloaded once per node into the node cache.
- `vllm` (GPUs): Ray Serve LLM (`ray.serve.llm.build_openai_app`) with a vLLM engine over the merged
  export, tensor parallel over the job's GPUs. Wired and documented, **not verified on a GPU yet**
  (docs/serve.md).

Requests beyond the concurrency limit wait in Serve's queue; beyond the queue they get 503 at once
(`max_ongoing_requests`, `max_queued_requests`). Everything shows in the Ray dashboard's Serve tab as
the application `fjordtune-<job name>`.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (`Request`) at runtime
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fjordtune.errors import InfraError, UserError
from fjordtune.serve.protocol import ApiError, models_list, parse_chat_request

log = logging.getLogger(__name__)

ENGINES = ("auto", "transformers", "vllm")
CONSTRUCTOR_TRIES = 3


@dataclass(frozen=True)
class ModelSource:
    """What a replica loads: a merged folder, or a base folder plus the adapter to merge into it."""

    merged: str | None = None
    base: str | None = None
    adapter: str | None = None

    def describe(self) -> str:
        return self.merged if self.merged else f"{self.base} + adapter {self.adapter}"


@dataclass(frozen=True)
class ServeOptions:
    model_id: str
    engine: str = "transformers"
    host: str = "127.0.0.1"
    port: int = 8000
    max_tokens: int = 512
    """Most new tokens per request; more is a 400."""
    max_concurrent: int = 4
    """Requests a replica works on at once (Serve's `max_ongoing_requests`); the rest wait in the queue."""
    max_queued: int = 16
    """Requests waiting beyond that; more get 503 at once (Serve's `max_queued_requests`)."""
    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: int = 0
    """transformers engine on GPUs: the fewest GPUs of one node that hold the model (`gpus_for_transformers`)."""

    @property
    def app_name(self) -> str:
        return f"fjordtune-{self.model_id}".replace("/", "-")

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"


def resolve_source(job: Any, *, adapter: str | None, merged: str | None, engine: str) -> ModelSource:
    """Check before deploying that what will be served exists (a 2 here beats a replica that fails to start):
    `--merged` as given; otherwise the base (staged like training stages it) plus `--adapter` (default the
    run's trained adapter). vLLM serves merged folders only: default the run's `fjordtune export` output."""
    from fjordtune.model.load import check_model_folder, stage_base_model
    from fjordtune.storage.store import Store

    if adapter and merged:
        raise UserError("give --adapter or --merged, not both (a merged folder already holds its adapter)")
    store = Store.for_job(job)
    if engine == "vllm" and not merged:
        merged = f"{job.run_uri}/export/merged"
        if adapter or not _exists(store, merged):
            raise UserError(f"--engine vllm serves a merged folder; none at {merged}: run `fjordtune export JOB "
                            f"--format merged{' --adapter ' + adapter if adapter else ''}` first, or give --merged")
    if merged:
        if not _exists(store, merged):
            raise UserError(f"--merged {merged}: no model folder there (write one with `fjordtune export JOB`)")
        check_model_folder(merged, store=store)  # its index and shards, from the listing: before any replica
        return ModelSource(merged=merged)
    adapter = adapter or f"{job.run_uri}/adapter"
    if not _exists(store, adapter):
        raise UserError(f"--adapter {adapter}: no committed adapter there (has the run finished training? "
                        "`fjordtune run JOB` writes it)")
    base = stage_base_model(job.model.path, run_uri=job.run_uri, store=store, seed=job.model.seed)
    return ModelSource(base=base, adapter=adapter)


def _exists(store: Any, uri: str) -> bool:
    if uri.startswith("s3://"):
        return store.is_committed(uri)
    return Path(uri).is_dir()


def gpus_for_transformers(job: Any) -> int:
    """GPUs per replica of the transformers engine: 0 on CPUs; on GPUs the fewest of one node whose memory
    holds the model, by preflight's inference estimate (the one that sizes eval replicas). A model no node
    holds is refused here, before a replica waits for GPUs that no node has."""
    if not job.resources.use_gpu:
        return 0
    from fjordtune.preflight.gate import capacity, count, estimate_eval

    counts, cap, per_node = count(job), capacity(job)[0], job.resources.gpus_per_node
    for gpus in range(1, per_node + 1):
        if estimate_eval(job, counts, cap, gpus=gpus).fits:
            return gpus
    need = estimate_eval(job, counts, cap, gpus=per_node).total_bytes / 2**30
    raise UserError(f"--engine transformers: the model needs about {need:.0f} GiB, more than the {per_node} GPUs of "
                    "one node hold; serve it with --engine vllm (tensor parallel over the merged export)")


def load_engine(job: Any, source: ModelSource, options: ServeOptions) -> Any:
    """Inside the replica: fetch (node cache), merge if needed, load through the verified loader."""
    from fjordtune.export.merged import export_merged
    from fjordtune.model.load import local_model_dir
    from fjordtune.serve.engine import ChatEngine
    from fjordtune.storage.store import Store, cache_root

    store, cache = Store.for_job(job), cache_root(job.storage.cache_dir)
    device = "cuda" if options.gpus_per_replica and _cuda() else "cpu"
    place = {"device": device, "device_map": "auto" if options.gpus_per_replica > 1 else None}
    start = time.monotonic()
    if source.merged:
        engine = ChatEngine.from_folder(local_model_dir(source.merged, store=store, cache_root=cache),
                                        model_id=options.model_id, max_tokens=options.max_tokens,
                                        dtype=job.model.dtype, **place)
    else:
        base = local_model_dir(source.base, store=store, cache_root=cache)
        adapter = local_model_dir(source.adapter, store=store, cache_root=cache)
        Path(cache).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="serve-merged-", dir=cache) as tmp:
            export_merged(base, adapter, Path(tmp) / "merged", dtype=job.model.dtype)
            engine = ChatEngine.from_folder(str(Path(tmp) / "merged"), model_id=options.model_id,
                                            max_tokens=options.max_tokens, dtype=job.model.dtype, **place)
    log.info("serving %s (%s) on %s, loaded in %.1f s", options.model_id, source.describe(), device,
             time.monotonic() - start)
    return engine


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_transformers_app(job: Any, source: ModelSource, options: ServeOptions) -> Any:
    """The Serve application of the transformers engine (a bound deployment with a FastAPI ingress)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray import serve
    from starlette.concurrency import run_in_threadpool

    api = FastAPI(title=f"fjordtune: {options.model_id}",
                  description="OpenAI-compatible chat completions of a fjordtune-tuned model")

    @serve.deployment(name="chat")
    @serve.ingress(api)
    class FjordtuneChat:
        def __init__(self) -> None:
            self.engine = load_engine(job, source, options)
            self.created = int(time.time())

        @api.get("/v1/models")
        def models(self) -> dict[str, Any]:
            return models_list(options.model_id, created=self.created, root=source.describe())

        @api.get("/health")
        def health(self) -> dict[str, Any]:
            return {"status": "ok", "model": options.model_id}

        @api.post("/v1/chat/completions")
        async def chat(self, request: Request) -> Any:
            try:
                try:
                    body = await request.json()
                except ValueError as e:
                    raise ApiError(400, f"the request body is not valid JSON ({e})") from None
                req = parse_chat_request(body, served_model=options.model_id, limits=self.engine.limits)
                prepared = self.engine.prepare(req)
                if req.stream:
                    return StreamingResponse(_sse(self.engine.stream(prepared)), media_type="text/event-stream")
                return await run_in_threadpool(self.engine.complete, prepared)
            except ApiError as e:
                return JSONResponse(e.body(), status_code=e.status)

    return FjordtuneChat.options(num_replicas=options.replicas, max_ongoing_requests=options.max_concurrent,
                                 max_queued_requests=options.max_queued,
                                 # a model that fails to load fails the same way again: say so after 3
                                 # tries, not Serve's default 20 (minutes of retries for a 238 GB model)
                                 max_constructor_retry_count=CONSTRUCTOR_TRIES,
                                 ray_actor_options={"num_cpus": options.cpus_per_replica,
                                                    "num_gpus": options.gpus_per_replica}).bind()


def _sse(chunks: Iterator[dict[str, Any]]) -> Iterator[str]:
    """Server-sent events as OpenAI streams them: `data: {chunk}`, ..., `data: [DONE]`. A failure after the
    first byte cannot change the status any more: it is sent as an `error` event."""
    try:
        for c in chunks:
            yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n"
    except Exception as e:  # noqa: BLE001  the client gets the reason, the log the traceback
        log.exception("stream failed")
        yield f"data: {json.dumps({'error': {'message': f'{type(e).__name__}: {e}', 'type': 'server_error'}})}\n\n"
    finally:
        close = getattr(chunks, "close", None)
        if close:
            close()
    yield "data: [DONE]\n\n"


def vllm_llm_config(job: Any, source: ModelSource, options: ServeOptions) -> dict[str, Any]:
    """Ray Serve LLM's `LLMConfig` (as a dict) for the merged folder: vLLM, tensor parallel over the job's
    GPUs on one node (at most 8), the same limits as the transformers engine. UNVERIFIED: no GPU check has
    run it yet (docs/serve.md)."""
    assert source.merged
    tp = min(job.resources.num_workers, job.resources.gpus_per_node, 8)
    model_source: Any = {"bucket_uri": source.merged} if source.merged.startswith("s3://") else source.merged
    return {
        "model_loading_config": {"model_id": options.model_id, "model_source": model_source},
        "engine_kwargs": {"tensor_parallel_size": tp, "dtype": "bfloat16", "max_model_len": job.data.max_seq_len * 4,
                          "max_num_seqs": options.max_concurrent},
        "deployment_config": {"num_replicas": options.replicas, "max_ongoing_requests": options.max_concurrent,
                              "max_queued_requests": options.max_queued},
    }


def require_vllm() -> None:
    """Ray Serve LLM imports only where vLLM is installed."""
    try:
        import ray.serve.llm  # noqa: F401
    except ImportError as e:
        raise UserError(f"--engine vllm needs vLLM: pip install 'ray[llm]==2.60.0' on the GPU nodes (a CUDA build, not "
                        f"in fjordtune's images; docs/serve.md) ({str(e).splitlines()[0][:200]})") from None


def build_vllm_app(job: Any, source: ModelSource, options: ServeOptions) -> Any:
    require_vllm()
    from ray.serve.llm import LLMConfig, build_openai_app

    return build_openai_app({"llm_configs": [LLMConfig(**vllm_llm_config(job, source, options))]})


def pick_engine(job: Any, engine: str) -> str:
    if engine not in ENGINES:
        raise UserError(f"--engine {engine}: choose one of {', '.join(ENGINES)}")
    if engine == "auto":
        return "vllm" if job.resources.use_gpu else "transformers"
    return engine


def deploy(job: Any, source: ModelSource, options: ServeOptions) -> None:
    """Start Serve (HTTP on `options.host:port`) on the connected Ray cluster and run the application under
    `options.app_name` at route `/`. Returns when its replicas are up; the application keeps running (Serve
    applications outlive the driver that deployed them) until `shutdown`."""
    from ray import serve

    serve.start(http_options={"host": options.host, "port": options.port})
    app = (build_vllm_app if options.engine == "vllm" else build_transformers_app)(job, source, options)
    try:
        serve.run(app, name=options.app_name, route_prefix="/", blocking=False)
    except RuntimeError as e:
        why = _replica_failure(options.app_name) or str(e).strip().splitlines()[-1]
        raise InfraError(f"serve: the application {options.app_name} did not start ({CONSTRUCTOR_TRIES} tries): "
                         f"{why[:500]} (the whole traceback: above, and in the Ray dashboard's Serve tab)") from None


def _replica_failure(app_name: str) -> str | None:
    """The last line of the error a failed replica left in Serve's status (the exception, not the traceback)."""
    from ray import serve

    try:
        deployments = serve.status().applications[app_name].deployments
    except Exception:  # noqa: BLE001  no status to read: the caller has Serve's own message
        return None
    for deployment in deployments.values():
        lines = [line.strip() for line in (deployment.message or "").splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return None


def shutdown(app_name: str) -> bool:
    """Delete the application; True when there was one."""
    from ray import serve

    try:
        apps = serve.status().applications
    except Exception:  # noqa: BLE001  Serve is not running on this cluster
        return False
    if app_name not in apps:
        return False
    serve.delete(app_name)
    return True


def client_lines(options: ServeOptions) -> list[str]:
    """A ready `curl` line and a Python `openai` client line for the served model."""
    body = json.dumps({"model": options.model_id, "temperature": 0, "max_tokens": 32,
                       "messages": [{"role": "user", "content": "Hva er hovedstaden i Norge?"}]}, ensure_ascii=False)
    return [
        f"curl -s {options.base_url}/chat/completions -H 'Content-Type: application/json' -d '{body}'",
        f"python -c \"from openai import OpenAI; c = OpenAI(base_url='{options.base_url}', api_key='none'); "
        f"print(c.chat.completions.create(model='{options.model_id}', temperature=0, max_tokens=32, "
        "messages=[{'role': 'user', 'content': 'Hva er hovedstaden i Norge?'}]).choices[0].message.content)\"",
    ]


def connect(address: str | None) -> bool:
    """Join the Ray cluster at `address` (default RAY_ADDRESS, else a cluster running on this machine).
    Without one, start a private local cluster: True then (the caller serves in the foreground)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        ray.init(address=address or "auto", logging_level="WARNING")
        return False
    except ConnectionError:
        if address:
            raise InfraError(f"serve: no Ray cluster at {address}") from None
    from fjordtune.devstack import token_auth_for_private_cluster

    token_auth_for_private_cluster()
    ray.init(address="local", logging_level="WARNING")
    return True
