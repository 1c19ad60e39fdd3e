"""One model replica over several devices by tensor parallelism: transformers' own TP plan, one process per
device, and a `Scorer` that every rank runs in lockstep. Ray-free (torch, transformers, peft).

`device_map="auto"` (what `Scorer` does with several GPUs) runs one GPU at a time. Here every rank holds a
slice of each weight the architecture's `base_model_tp_plan` names (for Mistral4: the routed and shared
experts, the embedding and `lm_head`; attention stays replicated) and all ranks work on every token.

    init_group(rank, world, master_addr=..., master_port=...)    # every rank
    model = load_tp_model(model_dir, dtype="bfloat16", device="cuda", adapter_dir=adapter_or_none)
    tp = TPScorer(model)
    rank 0:     tp.score(contexts, continuations); ...; tp.close()
    ranks 1..:  tp.serve()                                         # returns when rank 0 calls close()

Failure handling. A rank that fails inside a scoring call tears the process group down, so that the
others' pending collectives fail at once instead of waiting out the group's timeout (gloo: measured in
tests/test_eval_tp.py; NCCL does not notice a dead peer, there `timeout_s` bounds the wait). Between
calls, followers wait for rank 0 on the group's TCP store, not in a collective: an idle rank 0 (Ray Data
has no batch for it yet) never times them out, and a rank 0 that died (it hosts the store) ends them.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from fjordtune.errors import InfraError, InternalError, UserError
from fjordtune.eval.scorer import Scorer
from fjordtune.model.weights import CHUNK_BYTES, text_config

log = logging.getLogger(__name__)

IDLE_POLL_S = 30.0
"""How long a follower waits on the store for rank 0's next request before it looks again."""

_STORE: dist.Store | None = None  # the store `init_group` created: TPScorer's doorbell for followers
_SCORERS = itertools.count()  # every rank builds its TPScorers in the same order: their key prefixes agree


def init_group(rank: int, world: int, *, master_addr: str, master_port: int, backend: str | None = None,
               timeout_s: float = 600, local_rank: int | None = None) -> None:
    """Join the default torch.distributed process group (rank 0 hosts its TCP store at master_addr:port).

    gloo on CPU, nccl on CUDA unless `backend` says otherwise. On CUDA the process uses GPU `local_rank`:
    by default 0 when it sees one GPU (a Ray actor with `num_gpus=1`), else `rank % visible GPUs`.
    `LOCAL_RANK` is exported because transformers' TP loader picks its device from it.
    `timeout_s` bounds every collective, hence how long a rank waits for a peer that hangs.
    """
    global _STORE
    if dist.is_initialized():
        raise InternalError("init_group: a torch.distributed process group already exists in this process")
    if not 0 <= rank < world:
        raise InternalError(f"init_group: rank {rank} outside a world of {world}")
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    device_id = None
    if cuda:
        num_gpus = torch.cuda.device_count()
        local = local_rank if local_rank is not None else (0 if num_gpus == 1 else rank % num_gpus)
        torch.cuda.set_device(local)
        os.environ["LOCAL_RANK"] = str(local)
        device_id = torch.device("cuda", local) if backend == "nccl" else None
    timeout = timedelta(seconds=timeout_s)
    _STORE = None  # a previous group's store (after a failure) frees its port first
    store = dist.TCPStore(master_addr, master_port, world, is_master=rank == 0, timeout=timeout)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout,
                            device_id=device_id)
    _STORE = store
    log.info("rank %d/%d joined the %s group at %s:%d", rank, world, backend, master_addr, master_port)


def tp_supported(config: Any) -> bool:
    """Whether transformers has a tensor-parallel plan for this architecture (`base_model_tp_plan`)."""
    return bool(getattr(text_config(config), "base_model_tp_plan", None))


TP_SPLIT_SIZES = ("vocab_size", "intermediate_size", "moe_intermediate_size")
"""Config sizes that transformers' TP plans split (embedding and lm_head by vocabulary, MLPs and experts by
their intermediate width): a replica's GPU count must divide each."""


def tp_unsplittable(config: Any, world: int) -> list[str]:
    """The config sizes that do not divide by `world` (empty: the plan splits evenly), from the config alone,
    before anything is loaded; `load_tp_model` checks every loaded shard again."""
    cfg = text_config(config)
    return [f"{key}={getattr(cfg, key)}" for key in TP_SPLIT_SIZES
            if isinstance(getattr(cfg, key, None), int) and getattr(cfg, key) % world]


def replica_placement(config: Any, *, gpus: int, use_gpu: bool, requested: str = "auto") -> tuple[str, int]:
    """(`eval.placement` resolved, tensor-parallel ranks per replica) for a replica on `gpus` GPUs: a single
    device needs no placement ("single", 1); `tensor_parallel` where transformers has a plan and the sizes
    split evenly (auto), or where asked (then a clear error if it cannot); else `device_map`."""
    if not use_gpu or gpus <= 1:
        return "single", 1
    name = type(text_config(config)).__name__
    why_not = (f"transformers has no tensor-parallel plan for {name}" if not tp_supported(config) else
               "" if not tp_unsplittable(config, gpus) else
               f"{', '.join(tp_unsplittable(config, gpus))} do(es) not divide by {gpus} GPUs")
    if requested == "device_map":
        return "device_map", 1
    if not why_not:
        return "tensor_parallel", gpus
    if requested == "tensor_parallel":
        raise UserError(f"eval.placement: tensor_parallel over {gpus} GPUs per replica is not possible: {why_not}",
                        "set eval.placement to auto or device_map, or eval.gpus_per_worker to a count that divides")
    log.info("eval placement: device_map over %d GPUs (%s)", gpus, why_not)
    return "device_map", 1


def load_tp_model(model_dir: str, *, dtype: str, device: str, adapter_dir: str | None = None) -> Any:
    """Load a causal LM sharded over the current process group by transformers' TP plan for its
    architecture, every checkpoint tensor verified; with `adapter_dir`, fold a peft LoRA adapter into the
    shards (each rank adds only its slice of the update). Call on every rank, after `init_group`."""
    from transformers import AutoConfig
    from transformers.distributed import DistributedConfig

    from fjordtune.model.load import causal_lm_class

    config = AutoConfig.from_pretrained(model_dir)
    if not tp_supported(config):
        import transformers

        raise UserError(
            f"{model_dir}: transformers {transformers.__version__} has no tensor-parallel plan for "
            f"{type(text_config(config)).__name__} (its base_model_tp_plan is empty); score it with device_map "
            "placement instead (Scorer with device='cuda')")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise UserError(f"dtype {dtype!r} is not a torch dtype (float32, bfloat16, float16)")
    _check_device(device)
    if not dist.is_initialized():
        raise InternalError("load_tp_model needs the process group: call init_group on every rank first")
    world = dist.get_world_size()
    if world < 2:
        raise UserError("tensor parallelism needs 2 or more processes; with one device use Scorer")

    cls = causal_lm_class(config)
    # tp_size given: DistributedConfig(tp_plan="auto") alone takes it from $WORLD_SIZE, and without that
    # variable (a group made by init_process_group(store=...), as here) it silently loads unsharded
    model, info = cls.from_pretrained(model_dir, dtype=torch_dtype, output_loading_info=True,
                                      distributed_config=DistributedConfig(tp_size=world, tp_plan="auto"))
    problems = [f"{kind}: {sorted(map(str, info.get(kind) or []))[:5]}"
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs") if info.get(kind)]
    if problems:
        raise UserError(f"{model_dir}: the checkpoint does not match {cls.__name__}", *problems)
    on_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if on_meta:
        raise InternalError(f"{model_dir}: parameters left on the meta device after loading: {on_meta[:5]}")
    _check_divisible(model, world)
    if adapter_dir:
        num = merge_adapter_into_shards(model, adapter_dir)
        log.info("rank %d: merged %d LoRA updates of %s into its shards", dist.get_rank(), num, adapter_dir)
    return model.eval()


def _check_device(device: str) -> None:
    """transformers puts TP shards on the machine's accelerator, whatever is asked
    (`initialize_distributed_mesh` in transformers/distributed/utils.py): refuse a contradicting device."""
    accelerator = torch.accelerator.current_accelerator()
    actual = accelerator.type if accelerator is not None else "cpu"
    if torch.device(device).type != actual:
        raise UserError(f"device={device!r}: transformers' tensor parallelism places the shards on this machine's "
                        f"{actual!r} devices; pass device={actual!r}")


def _shard_dims(param: Any) -> list[tuple[int, int]]:
    """[(tensor dim, split factor)] that a TP DTensor is sharded on (a 1-D mesh gives at most one)."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.placement_types import _StridedShard  # fused gate_up (not a Shard subclass)

    if not isinstance(param, DTensor):
        return []
    if param.device_mesh.ndim != 1:
        raise InternalError(f"a TP parameter on a {param.device_mesh.ndim}-D mesh: only 1-D TP meshes are handled")
    out = []
    for p in param.placements:
        if isinstance(p, (Shard, _StridedShard)):
            out.append((p.dim % param.ndim, int(getattr(p, "split_factor", 1))))
        elif not p.is_replicate():
            raise InternalError(f"unexpected TP placement {p}")
    return out


def _check_divisible(model: Any, world: int) -> None:
    """Every sharded size splits evenly (transformers accepts uneven splits; the adapter merge, the memory
    balance and an attention head cut in half do not)."""
    uneven = []
    for name, p in model.named_parameters():
        for dim, split in _shard_dims(p):
            if p.shape[dim] % (world * split):
                uneven.append(f"{name}: dim {dim} of {tuple(p.shape)} does not split into {world} x {split}")
    cfg = text_config(model.config)
    if any(".self_attn." in n and _shard_dims(p) for n, p in model.named_parameters()):
        for key in ("num_attention_heads", "num_key_value_heads"):
            heads = getattr(cfg, key, None)
            if heads and heads % world:
                uneven.append(f"{key}={heads} does not divide by {world} ranks")
    if uneven:
        raise UserError(f"tensor parallelism over {world} processes splits weights unevenly; use a number of "
                        "devices that divides these sizes", *uneven[:8])


def shard_indices(size: int, *, rank: int, world: int, split_factor: int = 1) -> torch.Tensor:
    """Which indices of a dimension of `size` rank `rank` holds under `Shard` (split_factor 1) or
    `_StridedShard(split_factor=s)`: the dimension cut into s equal groups (gate and up of a fused
    `gate_up_proj`: s=2), each group cut into `world` contiguous blocks, the rank's block of every group.
    This is how transformers' loader reads the shards (`DtensorShardOperation` in
    transformers/distributed/sharding_utils.py), for sizes that divide."""
    if size % (world * split_factor):
        raise InternalError(f"size {size} does not split into {world} x {split_factor}")
    group, block = size // split_factor, size // (world * split_factor)
    return torch.cat([torch.arange(g * group + rank * block, g * group + (rank + 1) * block)
                      for g in range(split_factor)])


def local_param_bytes(model: Any, *, contains: str = "") -> int:
    """Bytes of the parameters this process holds (its shards of DTensors), over names containing `contains`."""
    from torch.distributed.tensor import DTensor

    total = 0
    for name, p in model.named_parameters():
        if contains in name:
            local = p.to_local() if isinstance(p, DTensor) else p
            total += local.numel() * local.element_size()
    return total


# ---- the LoRA adapter, folded into the shards ------------------------------------------------------------

def merge_adapter_into_shards(model: Any, adapter_dir: str | Path, *, chunk_bytes: int = CHUNK_BYTES) -> int:
    """W += scale * B @ A for every LoRA target, each rank computing and adding only the slice of the update
    that its shard holds (replicated weights: all of it), one weight and a bounded block of rows at a time.
    Returns the number of weights updated.

    peft cannot wrap the TP model itself (peft 0.21.2 tries to shard LoRA weights for a TP base and fails on
    the fused experts: `add_lora_tp_hooks_dtensor`, peft/tuners/lora/model.py:144). So the adapter is read as
    low-rank updates of named weights (`model/adapter.py`: checked against a meta copy of the architecture,
    one target's A and B in memory at a time).
    """
    from fjordtune.model.adapter import LoraUpdates

    num = 0
    with LoraUpdates.open(adapter_dir, model.config) as updates:
        for target in updates:
            try:
                param = model.get_parameter(target)
            except AttributeError:
                raise UserError(f"{adapter_dir}: adapter targets {target}, which the model does not have") from None
            update = updates.update(target)
            if tuple(param.shape) != update.shape:
                raise UserError(f"{adapter_dir}: {target}: the update is {update.shape}, the weight "
                                f"{tuple(param.shape)}")
            _add_low_rank(param, update.lhs, update.rhs, update.scale, chunk_bytes=chunk_bytes)
            num += 1
    return num


@torch.no_grad()
def _add_low_rank(param: Any, lhs: torch.Tensor, rhs: torch.Tensor, scale: float, *, chunk_bytes: int) -> None:
    """param += scale * lhs @ rhs (2-D, or batched over experts), restricted to this rank's shard of
    `param` and computed a block of rows at a time in float32."""
    from torch.distributed.tensor import DTensor

    local = param.to_local() if isinstance(param, DTensor) else param.data
    for dim, split in _shard_dims(param):
        mesh = param.device_mesh
        idx = shard_indices(param.shape[dim], rank=mesh.get_local_rank(), world=mesh.size(), split_factor=split)
        if dim == param.ndim - 2:
            lhs = lhs.index_select(-2, idx.to(lhs.device))
        elif dim == param.ndim - 1:
            rhs = rhs.index_select(-1, idx.to(rhs.device))
        elif dim == 0 and param.ndim == 3:
            lhs, rhs = lhs.index_select(0, idx.to(lhs.device)), rhs.index_select(0, idx.to(rhs.device))
        else:
            raise InternalError(f"cannot slice a LoRA update for a shard on dim {dim} of {tuple(param.shape)}")
    if tuple(local.shape) != tuple(lhs.shape[:-1]) + tuple(rhs.shape[-1:]):
        raise InternalError(f"local shard {tuple(local.shape)} is not the sliced update "
                            f"{tuple(lhs.shape[:-1]) + tuple(rhs.shape[-1:])}")
    out = local if local.ndim == 3 else local.unsqueeze(0)
    lhs = (lhs if lhs.ndim == 3 else lhs.unsqueeze(0)).to(local.device, torch.float32)
    rhs = (rhs if rhs.ndim == 3 else rhs.unsqueeze(0)).to(local.device, torch.float32)
    rows = out.shape[-2]
    step = max(1, chunk_bytes // max(1, out.shape[0] * out.shape[-1] * 4))
    for r0 in range(0, rows, step):
        part = out[:, r0 : r0 + step]
        delta = torch.matmul(lhs[:, r0 : r0 + step], rhs).mul_(scale)
        if not torch.isfinite(delta).all():
            raise UserError("the LoRA update has NaN or inf values: the adapter seems to be broken")
        if part.dtype == torch.float32:
            part.add_(delta)
        else:  # bf16: added in fp32, rounded once (peft's merge adds in the weight's dtype: <= 1 ulp apart)
            part.copy_(part.float().add_(delta))


# ---- scoring in lockstep ----------------------------------------------------------------------------------

def scorer_for_model(model: Any, *, max_length: int | None = None) -> Scorer:
    """A `Scorer` around a loaded TP model, its inputs on the device of the (local shard of the) embedding."""
    return Scorer.from_model(model, device=model.get_input_embeddings().weight.device, max_length=max_length)


class TPScorer:
    """A `Scorer` whose model is split over the process group: rank 0 takes the requests and broadcasts
    them, every rank runs the identical `Scorer.score` (so the TP collectives line up), rank 0 returns the
    results. Followers run `serve()` until rank 0 calls `close()`."""

    def __init__(self, model: Any, *, max_length: int | None = None) -> None:
        if not dist.is_initialized():
            raise InternalError("TPScorer needs the process group: call init_group first")
        self.scorer = scorer_for_model(model, max_length=max_length)
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        prefix = f"fjordtune/tp/{next(_SCORERS)}/"
        self._bell = dist.PrefixStore(prefix, _STORE) if _STORE is not None else None
        self._seq = 0
        self._closed = False
        self._broken = False
        # every rank must take the same code path through Scorer.score, else the collectives mismatch (gloo
        # then aborts the process: measured). Settings that choose the path must agree
        settings = (self.scorer.max_length, getattr(self.scorer, "packed", None), type(model).__name__)
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, settings)
        if any(s != settings for s in everyone):
            raise InternalError(f"TPScorer settings differ between ranks (max_length, packed, class): {everyone}")
        if self._bell is None and self.rank == 0:
            log.warning("TPScorer: process group not made by init_group; followers wait in a collective, so an "
                        "idle rank 0 times them out after the group's timeout")

    def score(self, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], *,
              shared_context: bool = True) -> list[tuple[float, bool]]:
        """On rank 0: `Scorer.score` over the whole group. The inputs are checked here first, so that a bad
        request fails on rank 0 alone and the followers keep serving."""
        if self.rank != 0:
            raise InternalError("TPScorer.score is rank 0's; the other ranks call serve()")
        self._usable()
        ctxs = [[int(t) for t in c] for c in contexts]
        conts = [[int(t) for t in c] for c in continuations]
        if len(ctxs) != len(conts):
            raise ValueError(f"{len(ctxs)} contexts but {len(conts)} continuations")
        if any(not c for c in conts):
            raise ValueError("empty continuation")
        if not conts:
            return []
        self._send(("score", ctxs, conts, bool(shared_context)))
        return self._run(ctxs, conts, shared_context=bool(shared_context))

    def serve(self) -> int:
        """On ranks 1..: score what rank 0 broadcasts until it calls `close()`; returns the requests served."""
        if self.rank == 0:
            raise InternalError("TPScorer.serve is for the follower ranks; rank 0 calls score() and close()")
        self._usable()
        served = 0
        while True:
            msg = self._receive()
            if msg[0] == "stop":
                self._closed = True
                log.info("rank %d: served %d requests; rank 0 closed", self.rank, served)
                return served
            _, ctxs, conts, shared = msg
            self._run(ctxs, conts, shared_context=shared)
            served += 1

    def close(self) -> None:
        """On rank 0: release the followers from `serve()`. Idempotent; a no-op after a failure."""
        if self.rank != 0 or self._closed or self._broken:
            return
        self._send(("stop",))
        self._closed = True

    def _usable(self) -> None:
        if self._broken:
            raise InfraError("tensor-parallel scoring already failed on this rank; its process group is gone")
        if self._closed:
            raise InternalError("TPScorer is closed")

    def _send(self, msg: tuple) -> None:
        self._seq += 1
        try:
            if self._bell is not None:
                self._bell.set(str(self._seq), b"1")
                if self._seq > 1:  # every rank has finished the previous request's collectives
                    self._bell.delete_key(str(self._seq - 1))
            dist.broadcast_object_list([msg], src=0)
        except Exception as e:
            self._fail(e)

    def _receive(self) -> tuple:
        self._seq += 1
        box: list[Any] = [None]
        try:
            if self._bell is not None:
                while True:
                    try:
                        self._bell.wait([str(self._seq)], timedelta(seconds=IDLE_POLL_S))
                        break
                    except dist.DistStoreError as e:
                        if "timeout" not in str(e).lower():
                            raise
            dist.broadcast_object_list(box, src=0)
        except Exception as e:
            self._fail(e)
        return box[0]

    def _run(self, ctxs: list[list[int]], conts: list[list[int]], *, shared_context: bool) -> list[tuple[float, bool]]:
        try:
            return self.scorer.score(ctxs, conts, shared_context=shared_context)
        except Exception as e:
            self._fail(e)

    def _fail(self, error: Exception) -> NoReturn:
        """Tear the process group down (the other ranks' pending collectives then fail at once instead of
        hanging until the timeout) and raise: a communication error as InfraError, anything else as it is."""
        self._broken = True
        log.error("rank %d: tensor-parallel scoring failed (%s: %s); tearing the process group down",
                  self.rank, type(error).__name__, error)
        try:
            dist.destroy_process_group()
        except Exception:  # already gone
            pass
        text = str(error)
        # gloo reports a peer that went away as a plain RuntimeError ("Connection closed by peer")
        if isinstance(error, dist.DistError) or (type(error) is RuntimeError and ("gloo" in text or "NCCL" in text)):
            raise InfraError(f"tensor-parallel scoring failed on rank {self.rank} of {self.world}: another rank "
                             f"failed or died (see its log): {type(error).__name__}: "
                             f"{text.splitlines()[0][:300] if text else ''}") from error
        raise error


# ---- one replica in one place: rank 0 here, the other ranks as child processes ------------------------------

def _follower_main(rank: int, world: int, port: int, model_dir: str, adapter_dir: str | None, dtype: str,
                   device: str, timeout_s: float, threads: int | None) -> None:
    """A follower rank's whole life: join, load its shards, serve rank 0 until it closes (or dies)."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp rank {rank}: %(message)s")
    if threads:
        torch.set_num_threads(threads)
    init_group(rank, world, master_addr="127.0.0.1", master_port=port, timeout_s=timeout_s)
    model = load_tp_model(model_dir, dtype=dtype, device=device, adapter_dir=adapter_dir)
    TPScorer(model).serve()
    dist.destroy_process_group()


class TPReplica:
    """A tensor-parallel replica owned by one process: rank 0 in the calling process (a Ray Data scoring
    actor), ranks 1..world-1 spawned as its child processes on the same machine, so that they see the same
    GPUs (Ray gives the actor all `world` of them) and the same node-local model folder (one download per
    node). `score` has `Scorer.score`'s signature; `close` releases the children.

    A child that dies makes rank 0's next collective fail (an `InfraError`: the actor dies and Ray restarts
    it, `eval.max_restarts`); rank 0 dying ends the children within seconds (their store is gone)."""

    def __init__(self, model_dir: str, *, world: int, dtype: str, device: str, adapter_dir: str | None = None,
                 timeout_s: float = 600, threads_per_rank: int | None = None) -> None:
        import multiprocessing
        import socket

        with socket.socket() as s:  # a free port for rank 0's store (children connect after it listens)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state, no Ray worker state
        self.children = [
            spawn.Process(target=_follower_main, name=f"fjordtune-tp-rank{r}", daemon=True,
                          args=(r, world, port, model_dir, adapter_dir, dtype, device, timeout_s, threads_per_rank))
            for r in range(1, world)]
        for child in self.children:
            child.start()
        try:
            if threads_per_rank:
                torch.set_num_threads(threads_per_rank)
            init_group(0, world, master_addr="127.0.0.1", master_port=port, timeout_s=timeout_s)
            model = load_tp_model(model_dir, dtype=dtype, device=device, adapter_dir=adapter_dir)
            self.tp = TPScorer(model)
        except BaseException:
            self._stop_children(grace_s=0)
            raise
        self.world = world
        log.info("tensor-parallel replica: %d ranks (pids %s and children %s)", world, os.getpid(),
                 [c.pid for c in self.children])

    @property
    def scorer(self) -> Scorer:
        return self.tp.scorer

    def score(self, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], *,
              shared_context: bool = True) -> list[tuple[float, bool]]:
        dead = [c.name for c in self.children if not c.is_alive()]
        if dead:  # say which, rather than fail inside a collective
            raise InfraError(f"tensor-parallel replica: {', '.join(dead)} exited (exit codes "
                             f"{[c.exitcode for c in self.children if not c.is_alive()]}); see its log above")
        return self.tp.score(contexts, continuations, shared_context=shared_context)

    def close(self, timeout_s: float = 30) -> None:
        try:
            self.tp.close()
        finally:
            self._stop_children(grace_s=timeout_s)
            if dist.is_initialized():
                dist.destroy_process_group()

    def _stop_children(self, *, grace_s: float) -> None:
        for child in self.children:
            child.join(timeout=grace_s)
            if child.is_alive():
                child.kill()
                child.join(timeout=5)
