"""Analytic memory and disk of the loading phase: a pure function of numbers, like `estimate.py`.

The sharded loader (`fjordtune.model.weights`) builds the model on the meta device, shards it, and
then fills each rank's slices straight from the safetensors files, one bounded chunk at a time. So
while loading:

- a rank's device holds its shards of the frozen weights and of the adapters, plus one staged chunk;
- a rank's host holds the process runtime and the staging buffers of one chunk (the read slice in the
  checkpoint's dtype, an fp32 copy when FP8 is dequantized, the result in the load dtype). Pages of
  the memory-mapped safetensors files are file-backed page cache, reclaimable, and not counted here;
- a node's disk holds the checkpoint once (the node-local cache), shared by every rank and actor.

An eval actor is not sharded: it holds the whole model over its GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fjordtune.preflight.estimate import shard_bytes
from fjordtune.preflight.params import ParamCounts

GiB = 1 << 30

STAGING_CHUNK_BYTES = 64 << 20
"""Largest chunk, in the load dtype, the loader reads and converts at a time (`model/weights.py`)."""
HOST_RUNTIME_BYTES = 3 * GiB
"""Host memory of one training or eval process before any weight is read: Python, torch, transformers,
peft, Ray's worker, and on GPUs the CUDA context's host side and NCCL's pinned buffers."""
FP32 = 4


@dataclass(frozen=True, kw_only=True)
class LoadingEstimate:
    """Peak bytes while the base weights are read (training ranks and one eval actor)."""

    num_workers: int
    ranks_per_node: int
    device_bytes_per_rank: int
    """This rank's shards of the frozen weights and the adapters, FSDP2's padding included (chunks are
    copied into them in place). On the GPU, or in host memory on CPU runs."""
    host_bytes_per_rank: int
    """Runtime + staging buffers (+ the shards themselves when training on CPU)."""
    eval_device_bytes_per_actor: int
    """The whole model and adapter of one eval actor, over all of its GPUs."""
    eval_host_bytes_per_actor: int
    checkpoint_bytes: int
    """Size of the base checkpoint on disk: the node-local cache holds it once per node."""
    staging_bytes: int
    """Host buffers at the loading peak: one chunk being read and converted, or the largest adapter factor
    being drawn, whichever is larger."""

    @property
    def host_bytes_per_node(self) -> int:
        """All training ranks of one node loading at the same time."""
        return self.ranks_per_node * self.host_bytes_per_rank

    @property
    def traced_comparable_bytes(self) -> int:
        """What a trace on one device sees while loading: the shards plus one chunk's staging."""
        return self.device_bytes_per_rank + self.staging_bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "device_bytes_per_rank": self.device_bytes_per_rank,
            "host_bytes_per_rank": self.host_bytes_per_rank,
            "host_bytes_per_node": self.host_bytes_per_node,
            "ranks_per_node": self.ranks_per_node,
            "eval_device_bytes_per_actor": self.eval_device_bytes_per_actor,
            "eval_host_bytes_per_actor": self.eval_host_bytes_per_actor,
            "checkpoint_bytes": self.checkpoint_bytes,
            "staging_bytes": self.staging_bytes,
        }

    def lines(self) -> list[str]:
        return [
            f"loading: per rank {_size(self.device_bytes_per_rank)} device (its shards of the weights and "
            f"adapters), {_size(self.host_bytes_per_rank)} host (runtime + {_size(self.staging_bytes)} staging a "
            f"chunk); {self.ranks_per_node} rank(s) per node: {_size(self.host_bytes_per_node)} host per node",
            f"loading: checkpoint {_size(self.checkpoint_bytes)} on each node's disk (downloaded once per node); "
            f"eval actor {_size(self.eval_device_bytes_per_actor)} device, {_size(self.eval_host_bytes_per_actor)} host",
        ]


def _size(num_bytes: int) -> str:
    return f"{num_bytes / GiB:.1f} GiB" if num_bytes >= GiB // 10 else f"{num_bytes / (1 << 20):.1f} MiB"


def staging_bytes(*, load_bytes: int, checkpoint_bytes: int, chunk_bytes: int = STAGING_CHUNK_BYTES,
                  largest_elements: int | None = None) -> int:
    """Host buffers of one chunk, as `model/checkpoint.py` reads it: the slice in the checkpoint's dtype;
    for FP8 also its fp32 dequantisation and the expanded scale (or the result in the load dtype,
    whichever is larger); for another dtype, the converted result; for the same dtype, nothing more.
    A chunk never exceeds the largest shard a rank reads (`largest_elements`)."""
    elems = chunk_bytes // load_bytes
    if largest_elements is not None:
        elems = min(elems, largest_elements)
    if checkpoint_bytes == 1:
        return elems * (1 + FP32 + max(FP32, load_bytes))
    if checkpoint_bytes != load_bytes:
        return elems * (checkpoint_bytes + load_bytes)
    return elems * load_bytes


def estimate_loading(counts: ParamCounts, *, num_workers: int, ranks_per_node: int, load_bytes: int = 2,
                     checkpoint_bytes_per_param: float | None = None, adapter_bytes: int = FP32,
                     on_cpu: bool = False, chunk_bytes: int = STAGING_CHUNK_BYTES,
                     host_runtime_bytes: int = HOST_RUNTIME_BYTES) -> LoadingEstimate:
    """Peak bytes of the loading phase for `num_workers` FSDP ranks, `ranks_per_node` of them per node.

    `load_bytes` is the dtype the base is loaded in (bf16: 2), `checkpoint_bytes_per_param` the stored
    dtype (FP8: 1; default: the load dtype). Shards are FSDP2's: dim 0 of every parameter padded to a
    multiple of the world size. With `on_cpu` the shards live in host memory.
    """
    if num_workers < 1 or ranks_per_node < 1:
        raise ValueError("num_workers and ranks_per_node must be positive")
    w = num_workers
    stored = checkpoint_bytes_per_param if checkpoint_bytes_per_param is not None else load_bytes
    shard = shard_bytes(counts.root_param_shapes, w, load_bytes) + shard_bytes(counts.root_lora_shapes, w, adapter_bytes)
    for g in counts.layer_groups:
        shard += g.num_layers * (shard_bytes(g.param_shapes, w, load_bytes) + shard_bytes(g.lora_shapes, w, adapter_bytes))
    shapes = [*counts.root_param_shapes, *(s for g in counts.layer_groups for s in g.param_shapes)]
    largest = max((-(-shape[0] // w) * math.prod(shape[1:]) if shape else 1 for _, shape in shapes), default=0)
    staged = staging_bytes(load_bytes=load_bytes, checkpoint_bytes=max(1, round(stored)), chunk_bytes=chunk_bytes,
                           largest_elements=largest)
    # adapters are drawn whole (fp32, on the host) before a rank keeps its rows: one factor at a time
    factors = [*counts.root_lora_shapes, *(s for g in counts.layer_groups for s in g.lora_shapes)]
    staged = max(staged, max((math.prod(shape) * FP32 for _, shape in factors), default=0))
    host = host_runtime_bytes + staged + (shard if on_cpu else 0)
    whole = counts.total_params * load_bytes + counts.lora_params * adapter_bytes
    return LoadingEstimate(
        num_workers=w, ranks_per_node=min(ranks_per_node, w),
        device_bytes_per_rank=shard, host_bytes_per_rank=host,
        eval_device_bytes_per_actor=whole, eval_host_bytes_per_actor=host_runtime_bytes + staged,
        checkpoint_bytes=int(counts.total_params * stored), staging_bytes=staged,
    )
