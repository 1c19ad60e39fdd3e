"""The traced twin of the analytic estimator: run the project's real setup and training step, at the real
world size, on fake tensors, and measure what they hold.

One process stands in for rank 0 of `num_workers`: a fake process group (`FakeStore`) gives FSDP2 the
real world size, `FakeTensorMode` gives every tensor a shape and a dtype but no memory, and torch's
trackers count the bytes that would be live:

1. **loading** (`MemTracker`): `TrainerCore.allocate` (this rank's shards, adapters, optimizer) and
   `load_base_weights`, reading shapes-only weights chunk by chunk through the same loader, with the
   staging buffers a real read makes (the slice in the checkpoint's dtype, its fp32 dequantisation, the
   result);
2. **training** (`FSDPMemTracker`): two steps of `forward_backward` + AdamW on a micro-batch of
   `data.max_seq_len` tokens (the first creates the optimizer states, the second is the steady state).

What a tensor tracker cannot see (CUDA context, NCCL buffers, allocator fragmentation) is not here:
compare these figures with the analytic *live* bytes. After torchtitan's estimation script; the recipe
is in FIELD-NOTES ("Traced memory estimate").
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from fjordtune.config.schema import JobSpec

log = logging.getLogger(__name__)

NUM_STEPS = 2


@dataclass(frozen=True)
class TracedEstimate:
    num_workers: int
    loading_peak_bytes: int
    """Rank 0's peak while allocating and loading: shards, adapters, optimizer object, one chunk's staging."""
    training_peak_bytes: int
    """Rank 0's peak over the training steps (live tensors, as FSDPMemTracker counts them)."""
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "loading_peak_bytes": self.loading_peak_bytes,
                "training_peak_bytes": self.training_peak_bytes, "seconds": round(self.seconds, 1)}


class ShapeOnlyWeights:
    """A `WeightSource` with the model's own names and shapes and no data: under `FakeTensorMode`, every
    read allocates what a real read of a `checkpoint_dtype` file would, and nothing else."""

    def __init__(self, model: Any, *, checkpoint_dtype: Any) -> None:
        from fjordtune.model.checkpoint import TensorSource
        from fjordtune.model.weights import canonical_name

        self.checkpoint_dtype = checkpoint_dtype
        self.skipped: dict[str, int] = {}
        self.sources = {
            canonical_name(n): TensorSource(key=n, file="<traced>", shape=tuple(p.shape), dtype="traced")
            for n, p in model.named_parameters() if "lora_" not in n
        }

    def read_rows(self, name: str, start: int, stop: int, *, dtype: Any) -> Any:
        import torch

        shape = self.sources[name].shape
        raw = torch.empty((stop - start, *shape[1:]) if shape else (), dtype=self.checkpoint_dtype)
        if self.checkpoint_dtype.itemsize == 1:  # FP8: dequantised through fp32, times an expanded scale
            x = raw.to(torch.float32)
            return x.mul_(torch.empty_like(x)).to(dtype)
        return raw.to(dtype)


def trace_memory(job: JobSpec, config: Any, *, checkpoint_bytes_per_param: float | None = None) -> TracedEstimate:
    """Trace rank 0 of `job.resources.num_workers` ranks (see the module docstring)."""
    import torch
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from fjordtune.errors import UserError
    from fjordtune.train.core import TrainerCore

    world = job.resources.num_workers
    if dist.is_initialized():
        raise UserError("preflight --method traced needs a process without a process group of its own")
    if world < 2:
        raise UserError("preflight --method traced models FSDP2 sharding: it needs resources.num_workers >= 2")
    if job.model.dtype != "bfloat16":
        raise UserError(f"preflight --method traced traces the GPU path in bfloat16; this job loads {job.model.dtype} "
                        "(--set model.dtype=bfloat16 to trace it)")
    load_dtype = getattr(torch, job.model.dtype)
    stored = checkpoint_bytes_per_param or load_dtype.itemsize
    ckpt_dtype = torch.float8_e4m3fn if stored == 1 else torch.bfloat16 if stored == 2 else torch.float32
    t0 = time.perf_counter()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        # build on meta, LoRA, activation checkpointing, fully_shard: exactly as a training rank does
        core = TrainerCore(job, model_dir=None, config=config, device=torch.device("cpu"), allocate=False)
        weights = ShapeOnlyWeights(core.model, checkpoint_dtype=ckpt_dtype)
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        with fake, _peak(MemTracker()) as loading:
            core.allocate()
            core.load_base_weights(weights=weights)
        tokens = job.train.micro_batch_size, job.data.max_seq_len
        vocab = int(getattr(core.model.config, "vocab_size", 0) or 2)
        with fake, _peak(FSDPMemTracker(core.model, core.optimizer)) as training:
            for step in range(NUM_STEPS):
                ids = torch.randint(0, vocab, tokens)
                core.forward_backward({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids,
                                      num_tokens_total=float(ids.numel()))
                core.optimizer.step()
                core.optimizer.zero_grad(set_to_none=True)
                if step == 0:
                    training.tracker.reset_mod_stats()
    finally:
        dist.destroy_process_group()
    return TracedEstimate(world, loading.bytes, training.bytes, time.perf_counter() - t0)


@dataclass
class _Peak:
    tracker: Any
    bytes: int = 0


@contextlib.contextmanager
def _peak(tracker: Any):
    """Enter `tracker`; afterwards `.bytes` is its peak total over every device (one: the CPU)."""
    holder = _Peak(tracker)
    with tracker:
        yield holder
    snapshot = tracker.get_tracker_snapshot("peak")
    holder.bytes = int(sum(dev.get("Total", 0) for dev in snapshot.values()))
