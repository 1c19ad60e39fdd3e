"""Build a model without memory, then give each process only its own slices of the base weights.

The order, after torchtune's distributed LoRA recipe: `build_meta_model` (parameters on the meta
device, buffers real) -> LoRA, activation checkpointing and `fully_shard` (the caller) ->
`materialize` (allocate this rank's shards) -> `load_base_weights` (fill them from the checkpoint,
one bounded chunk of rows at a time) -> `init_adapters` -> `verify_materialized`. No process ever
holds more than its shards plus one chunk: at 119B that is the difference between 32 GiB and
222 GiB per rank.

The same functions load a whole model for one process (eval, tests): a plain tensor is a "shard"
that starts at row 0 and has every row.

Why safetensors slices and not DCP's `HuggingFaceStorageReader` (docs/decisions.md): the released
Mistral Small 4 stores its text weights under multimodal names beside a vision tower, and FP8 with
per-block scales; DCP's reader neither renames nor skips keys, and its quantized reader wants each
quantized tensor whole in one file. Reading `safe_open(...).get_slice(key)[a:b]` gives exactly a
rank's dim-0 rows, for FSDP2's `Shard(0)`, with the renaming and dequantisation done on the way.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from fjordtune.errors import InternalError, UserError
from fjordtune.model.checkpoint import WeightSource, iter_row_chunks

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 << 20
"""Rows read, converted and copied at a time, in the load dtype (preflight/loading.py counts it)."""
PEFT_SEGMENTS = ("base_layer",)
PEFT_PREFIX = "base_model.model."


def canonical_name(name: str) -> str:
    """A parameter's name in the plain model: without peft's `base_model.model.` prefix and `base_layer`
    wrappers (`...experts.base_layer.base_layer.gate_up_proj` -> `...experts.gate_up_proj`)."""
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    return ".".join(p for p in name.split(".") if p not in PEFT_SEGMENTS)


def text_config(config: Any) -> Any:
    """The text model's config: multimodal wrappers (Mistral3 for Mistral Small 4) keep it in `text_config`."""
    return getattr(config, "text_config", None) or config


def build_meta_model(config: Any, *, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `config` with every parameter on the meta device (no memory) in `dtype`, and its
    buffers (rotary frequencies) real on the CPU: `materialize` keeps them."""
    from accelerate import init_empty_weights

    from fjordtune.model.load import causal_lm_class

    config = text_config(config)
    cls = causal_lm_class(config)  # Mistral4 is missing from the auto mapping: `architectures` or XConfig -> X
    with default_dtype(dtype), init_empty_weights(include_buffers=False):
        model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
    # accelerate re-registers every parameter on meta as a new object, which unties tied embeddings
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()
    return model


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules with `dtype` parameters (transformers' constructors take the default dtype)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def materialize(model: nn.Module, device: torch.device | str, *, device_map: dict[str, Any] | None = None) -> None:
    """Allocate every parameter (a rank's shards after `fully_shard`) on `device`, or module by module as
    `device_map` places them, uninitialised; buffers keep the values they were built with."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if not b.is_meta}
    if device_map:
        for module_name, dev in device_map.items():
            (model.get_submodule(module_name) if module_name else model).to_empty(device=dev)
    else:
        model.to_empty(device=device)
    with torch.no_grad():
        for name, value in buffers.items():
            buf = model.get_buffer(name)
            buf.copy_(value.to(buf.device))
    # to_empty gives every module its own new parameter object: tied embeddings must be tied again
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()


@dataclass(frozen=True)
class LoadStats:
    num_tensors: int
    bytes_loaded: int
    seconds: float
    skipped: dict[str, int]


def _local(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this process's part of `param`, its first row in the full tensor): the dim-0 shard of an FSDP2
    DTensor on a 1-D mesh, or the whole tensor. FSDP2 splits dim 0 like `torch.chunk`: shards of
    ceil(rows / world) rows, the last ones shorter or empty."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return param.data, 0
    if param.device_mesh.ndim != 1 or param.placements != (Shard(0),):
        raise InternalError(f"cannot load a parameter placed as {param.placements} on a {param.device_mesh.ndim}-D "
                            "mesh: only dim-0 shards on a 1-D mesh are read")
    local = param.to_local()
    rows, world = param.shape[0], param.device_mesh.size()
    chunk = -(-rows // world)
    offset = min(rows, param.device_mesh.get_local_rank() * chunk)
    if local.shape[0] != max(0, min(chunk, rows - offset)):
        raise InternalError(f"local shard of {local.shape[0]} rows at row {offset} does not match FSDP2's split of "
                            f"{rows} rows over {world} ranks")
    return local, offset


def load_base_weights(model: nn.Module, weights: WeightSource, *, where: str,
                      is_adapter: Callable[[str], bool] = lambda n: "lora_" in n,
                      chunk_bytes: int = CHUNK_BYTES) -> LoadStats:
    """Fill every non-adapter parameter of `model` (shards or whole) from `weights`, after checking that
    each parameter has a checkpoint tensor of its shape and each checkpoint tensor has a parameter."""
    names: dict[int, list[str]] = {}  # a tied parameter (lm_head = embedding) has several names
    params: dict[str, torch.Tensor] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if not is_adapter(n):
            names.setdefault(id(p), []).append(canonical_name(n))
            params.setdefault(names[id(p)][0], p)
    stored = {id(p): next((a for a in names[id(p)] if a in weights.sources), None) for p in params.values()}
    known = {a for aliases in names.values() for a in aliases}
    missing = sorted(n for n, p in params.items() if stored[id(p)] is None)
    unexpected = sorted(k for k in weights.sources if k not in known)
    params = {stored[id(p)]: p for p in params.values() if stored[id(p)] is not None} if not missing else params
    mismatched = sorted(f"{n}: checkpoint {weights.sources[n].shape}, model {tuple(p.shape)}"
                        for n, p in params.items() if n in weights.sources and weights.sources[n].shape != tuple(p.shape))
    problems = [f"{where}: {kind}: {', '.join(items[:4])}{f', ... ({len(items)} in all)' if len(items) > 4 else ''}"
                for kind, items in (("missing keys", missing), ("unexpected keys (checkpoint tensors no parameter uses)", unexpected),
                                    ("mismatched shapes", mismatched)) if items]
    if problems:
        raise UserError(*problems, "refusing to continue: a model with ignored or uninitialised weights scores at "
                        "chance (the story's 21% run). Check that the checkpoint matches the architecture.")
    total = sum(_local(p)[0].numel() * p.element_size() for p in params.values())
    t0 = last = time.perf_counter()
    done = 0
    with torch.no_grad():
        for name, param in params.items():
            local, offset = _local(param)
            if local.numel() == 0:
                continue
            if local.dim() == 0:
                local.copy_(weights.read_rows(name, 0, 1, dtype=local.dtype).reshape(()))
                continue
            for a, b in iter_row_chunks(tuple(local.shape), element_bytes=local.element_size(), chunk_bytes=chunk_bytes):
                local[a:b].copy_(weights.read_rows(name, offset + a, offset + b, dtype=local.dtype))
            done += local.numel() * local.element_size()
            if time.perf_counter() - last > 10:
                last = time.perf_counter()
                log.info("loading %s: %.1f of %.1f GiB (%.0f%%)", where, done / 2**30, total / 2**30, 100 * done / total)
    seconds = time.perf_counter() - t0
    log.info("loaded %d tensors (%.2f GiB for this process) from %s in %.1f s", len(params), total / 2**30, where, seconds)
    return LoadStats(len(params), total, seconds, dict(weights.skipped))


def init_adapters(model: nn.Module, *, seed: int) -> int:
    """Initialise every LoRA parameter as peft does (A: Kaiming-uniform with a=sqrt(5), B: zeros), from a
    generator seeded per parameter name, so one process and N FSDP ranks start from the same adapter.

    Each tensor is drawn whole on the CPU and only this process's rows are kept (the largest, an
    expert stack's factor at 119B, is ~64 MiB)."""
    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            leaf = canonical_name(name)
            full = torch.empty(tuple(param.shape), dtype=torch.float32)
            if ".lora_A." in f".{leaf}.":
                gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(leaf.encode()))
                torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)
            elif ".lora_B." in f".{leaf}.":
                full.zero_()
            else:
                raise InternalError(f"{name}: trainable but not a LoRA factor; do not know how to initialise it")
            local, offset = _local(param)
            local.copy_(full[offset: offset + local.shape[0]] if local.dim() else full)
            del full  # before the next one is drawn: one factor in host memory at a time, not two
            count += 1
    return count


def verify_materialized(model: nn.Module) -> None:
    """Nothing may be left on the meta device (a parameter no loader touched)."""
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise InternalError(f"{len(left)} tensors were never materialised (first: {left[0]})")


def load_model(model_dir: str, *, dtype: torch.dtype, device: torch.device | str = "cpu",
               device_map: str | None = None) -> nn.Module:
    """A whole model in one process (eval, tests), through the same path as the sharded trainer; with
    `device_map="auto"`, its decoder layers spread over the visible GPUs as accelerate balances them."""
    from transformers import AutoConfig

    from fjordtune.model.checkpoint import SafetensorsCheckpoint

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"{model_dir}: cannot read the model config ({e})") from None
    with SafetensorsCheckpoint.open(model_dir) as ckpt:
        model = build_meta_model(config, dtype=dtype)
        placement = _device_map(model, dtype) if device_map == "auto" else None
        materialize(model, device, device_map=placement)
        load_base_weights(model, ckpt, where=model_dir)
    verify_materialized(model)
    if placement:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map=placement)
    return model.eval()


def _device_map(model: nn.Module, dtype: torch.dtype) -> dict[str, Any]:
    """accelerate's balanced placement of whole decoder layers over the visible GPUs."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    memory = get_balanced_memory(model, dtype=dtype, no_split_module_classes=no_split)
    return infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)
