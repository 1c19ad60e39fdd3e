"""Preflight: predict per-GPU memory before a GPU is allocated.

- `params`: parameter and LoRA counts of a model built on the meta device (`ParamCounts`).
- `estimate`: the analytic estimator, a pure function of `ParamCounts` and the run's numbers.
A traced twin (fake process group + FakeTensorMode + FSDPMemTracker) lives beside them when present.

Importing this package imports no torch; `params` imports torch, transformers and peft inside its
functions only.
"""

from fjordtune.preflight.estimate import (
    DEFAULT_FRAGMENTATION_FRACTION,
    DEFAULT_HEADROOM_FRACTION,
    DEFAULT_RUNTIME_OVERHEAD_BYTES,
    GB,
    H100_80GB_BYTES,
    GiB,
    MemoryEstimate,
    MemoryTerm,
    estimate_memory,
    explain_refusal,
    min_workers,
)
from fjordtune.preflight.params import (
    LayerGroup,
    ParamCounts,
    count_parameters,
    meta_model_from_config,
)

__all__ = [
    "DEFAULT_FRAGMENTATION_FRACTION",
    "DEFAULT_HEADROOM_FRACTION",
    "DEFAULT_RUNTIME_OVERHEAD_BYTES",
    "GB",
    "H100_80GB_BYTES",
    "GiB",
    "LayerGroup",
    "MemoryEstimate",
    "MemoryTerm",
    "ParamCounts",
    "count_parameters",
    "estimate_memory",
    "explain_refusal",
    "meta_model_from_config",
    "min_workers",
]
