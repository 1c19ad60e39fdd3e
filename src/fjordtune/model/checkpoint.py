"""Hugging Face safetensors checkpoints, read a slice at a time: layouts, FP8 scales, verification.

A checkpoint folder is opened once (`SafetensorsCheckpoint.open`): its index is read, every shard
file must be present, and every stored tensor is classified against the text model's parameter
names:

- **layouts**: a text-only folder (`model.*`, `lm_head.*`), and the multimodal wrappers the released
  Mistral Small 4 loads through (`Mistral3ForConditionalGeneration`): `model.language_model.*` (and
  the older `language_model.model.*` / `language_model.lm_head.*`) are renamed to the text model's
  names, the vision tower and the multimodal projector are counted and skipped;
- **FP8**: a `float8_*` tensor must come with its scale, stored as transformers' fine-grained FP8
  writes it (`<weight>_scale_inv`, also `<weight>_scale` and `.qscale_weight`): per tensor, per
  expert, per channel or per block (the block size is read off the scale grid). Rows are dequantized
  to the load dtype as they are read. Static activation scales are counted and skipped: they scale
  FP8 activations, which a dequantized model never has.

`read_rows` returns rows `[start, stop)` of dim 0 of one tensor, which is what an FSDP2 rank (dim-0
shards) or a bounded-memory copy needs. Nothing here knows about FSDP or models.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from fjordtune.errors import UserError

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

#: stored prefix -> text-model prefix, tried in order (the first match wins)
RENAMES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
#: stored prefixes of tensors a text model does not have, and what they are
SKIPPED_PREFIXES = (
    ("model.vision_tower.", "vision tower"),
    ("vision_tower.", "vision tower"),
    ("model.multi_modal_projector.", "multimodal projector"),
    ("multi_modal_projector.", "multimodal projector"),
)
ACTIVATION_SCALE_SUFFIXES = ("activation_scale", "input_scale")
#: weight-scale suffix -> what replaces it to give the weight's name
SCALE_SUFFIXES = (("_scale_inv", ""), (".qscale_weight", ".weight"), ("_scale", ""))
FP8_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E8M0")

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorSource:
    """Where one text-model tensor is stored (and its scale, for FP8)."""

    key: str
    file: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string, e.g. "BF16", "F8_E4M3"
    scale_key: str | None = None
    scale_file: str | None = None

    @property
    def quantized(self) -> bool:
        return self.scale_key is not None


class WeightSource(Protocol):
    """What the loaders read from: a checkpoint on disk, or shapes only (the traced preflight)."""

    sources: dict[str, TensorSource]
    skipped: dict[str, int]

    def read_rows(self, name: str, start: int, stop: int, *, dtype: torch.dtype) -> torch.Tensor: ...


@dataclass
class SafetensorsCheckpoint:
    """A Hugging Face safetensors folder, classified against text-model names; read with `read_rows`."""

    directory: Path
    sources: dict[str, TensorSource]
    skipped: dict[str, int] = field(default_factory=dict)
    """What was counted and skipped, by kind ("vision tower": 438, ...)."""
    block_size: tuple[int, int] | None = None
    """`quantization_config.weight_block_size` of config.json, for FP8 scale grids with partial blocks."""
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)
    _handles: dict[str, Any] = field(default_factory=dict, repr=False)
    _scales: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, directory: str | Path) -> SafetensorsCheckpoint:
        directory = Path(directory)
        files, expected = shard_files(directory)
        stored: dict[str, tuple[str, tuple[int, ...], str]] = {}
        from safetensors import safe_open

        for name in files:
            with safe_open(str(directory / name), framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    stored[key] = (name, tuple(sl.get_shape()), sl.get_dtype())
        missing = sorted(k for k in expected if k not in stored)
        if missing:
            raise UserError(f"{directory}: the index lists {len(missing)} tensor(s) its shard files do not hold "
                            f"(first: {missing[0]}): the download is incomplete or the index is stale")
        sources, skipped = classify(stored, where=str(directory))
        ckpt = cls(directory, sources, skipped, block_size=_weight_block_size(directory))
        total = sum(skipped.values())
        if total:
            log.info("%s: %d tensor(s) are not part of the text model and were skipped: %s", directory, total,
                     ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items())))
        return ckpt

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()
        self._scales.clear()

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            from safetensors import safe_open

            self._handles[file] = self._stack.enter_context(safe_open(str(self.directory / file), framework="pt"))
        return self._handles[file]

    def read_rows(self, name: str, start: int, stop: int, *, dtype: torch.dtype) -> torch.Tensor:
        """Rows `[start, stop)` of dim 0 of text-model tensor `name`, dequantized, in `dtype` (CPU)."""
        src = self.sources[name]
        sl = self._handle(src.file).get_slice(src.key)
        raw = sl[start:stop] if src.shape else sl[:]
        if not src.quantized:
            return raw.to(dtype)
        if src.scale_key not in self._scales:  # scales are small: ~1/16,000 of their weight
            self._scales[src.scale_key] = self._handle(src.scale_file).get_tensor(src.scale_key).float()
        return dequantize_rows(raw, self._scales[src.scale_key], full_shape=src.shape, start=start,
                               block=self.block_size).to(dtype)


def _weight_block_size(directory: Path) -> tuple[int, int] | None:
    try:
        quant = json.loads((directory / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    block = quant.get("weight_block_size")
    return (int(block[0]), int(block[1])) if isinstance(block, list) and len(block) == 2 else None


def shard_files(directory: Path) -> tuple[list[str], set[str]]:
    """(shard files, keys the index promises) of a local Hugging Face safetensors folder; one-line errors
    for a folder that is not a complete safetensors checkpoint."""
    present = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
    return check_folder(present, lambda: (directory / INDEX_FILE).read_bytes(), where=str(directory))


def check_folder(present: set[str], read_index: Callable[[], bytes], *, where: str) -> tuple[list[str], set[str]]:
    """The same checks from a listing, so that a folder in object storage is checked before any worker
    downloads it: (shard files, keys the index promises)."""
    if INDEX_FILE in present:
        try:
            weight_map = json.loads(read_index())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{where}/{INDEX_FILE}: not a safetensors index ({type(e).__name__}: {e})") from None
        names = sorted(set(weight_map.values()))
        absent = [f for f in names if f not in present]
        if absent:
            raise UserError(f"{where}: {len(absent)} of {len(names)} shard files listed in {INDEX_FILE} are "
                            f"missing ({', '.join(absent[:3])}{', ...' if len(absent) > 3 else ''})")
        return names, set(weight_map)
    if SINGLE_FILE in present:
        return [SINGLE_FILE], set()
    if not present:
        raise UserError(f"{where}: no such model folder, or it is empty")
    hint = ""
    if any(n.startswith("consolidated") or n == "params.json" for n in present):
        hint = " (this looks like Mistral's native format: use the Hugging Face folder of the same release)"
    elif any(n.endswith((".bin", ".pt", ".pth")) for n in present):
        hint = " (PyTorch pickles are not read: convert them to safetensors)"
    elif any(n.endswith(".gguf") for n in present):
        hint = " (GGUF is an inference format: use the safetensors release)"
    shown = sorted(present)
    raise UserError(f"{where}: checkpoint format not recognised: expected {SINGLE_FILE} or {INDEX_FILE}, found "
                    f"{', '.join(shown[:6])}{', ...' if len(shown) > 6 else ''}{hint}")


def classify(stored: dict[str, tuple[str, tuple[int, ...], str]], *,
             where: str) -> tuple[dict[str, TensorSource], dict[str, int]]:
    """Map stored keys to text-model names; pair FP8 weights with their scales; count what is skipped."""
    skipped: dict[str, int] = {}
    weights: dict[str, tuple[str, tuple[str, tuple[int, ...], str]]] = {}  # name -> (key, info)
    candidates: list[tuple[str, str]] = []  # (key, renamed) of possible scales
    for key, info in stored.items():
        kind = next((k for prefix, k in SKIPPED_PREFIXES if key.startswith(prefix)), None)
        if kind is None and key.endswith(ACTIVATION_SCALE_SUFFIXES):
            kind = "activation scales (static FP8 activations; unused once weights are dequantized)"
        if kind is None and key.endswith("rotary_emb.inv_freq"):
            kind = "rotary buffers (recomputed)"
        if kind is not None:
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        name = rename(key)
        if any(name.endswith(suffix) for suffix, _ in SCALE_SUFFIXES):
            candidates.append((key, name))
        weights[name] = (key, info)
    fp8 = {n for n, (_, info) in weights.items() if info[2] in FP8_DTYPES}
    scales: dict[str, tuple[str, str]] = {}  # weight name -> (scale key, scale file)
    for key, name in candidates:
        for suffix, repl in SCALE_SUFFIXES:
            if name.endswith(suffix) and (target := name[: -len(suffix)] + repl) in fp8:
                scales[target] = (key, stored[key][0])
                weights.pop(name, None)
                break
    unscaled = sorted(fp8 - set(scales))
    if unscaled:
        raise UserError(f"{where}: checkpoint format not recognised: {len(unscaled)} FP8 tensor(s) without a scale "
                        f"(first: {weights[unscaled[0]][0]}); expected <name>_scale_inv beside each, as transformers "
                        "writes fine-grained FP8")
    sources = {}
    for name, (key, (file, shape, dtype)) in weights.items():
        scale = scales.get(name)
        sources[name] = TensorSource(key, file, shape, dtype, scale[0] if scale else None, scale[1] if scale else None)
    return sources, skipped


def rename(key: str) -> str:
    for old, new in RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, *, full_shape: tuple[int, ...], start: int,
                    block: tuple[int, int] | None = None) -> torch.Tensor:
    """fp32 rows `[start, start + len(q))` of an FP8 tensor of `full_shape` times its scale.

    The scale grid says the granularity: one value (per tensor), one per expert ([E] or [E, 1, 1]), one
    per row ([R, 1]), or blocks of the last two dims. A block grid needs `block` (the config's
    `weight_block_size`) where a dim is not a multiple of its grid: 24 rows in 2 blocks are blocks of 16
    with a partial edge block (as DeepSeek-style checkpoints store them), not blocks of 12.
    """
    x = q.to(torch.float32)
    if scale.numel() == 1:
        return x.mul_(scale.reshape(()))
    nd = len(full_shape)
    if scale.dim() > nd:
        raise UserError(f"an FP8 scale of shape {tuple(scale.shape)} does not fit a weight of shape {full_shape}")
    s = scale.reshape(tuple(scale.shape) + (1,) * (nd - scale.dim()))
    sizes = [_block_size(full_shape[d], s.shape[d], block[d - nd + 2] if block and d >= nd - 2 else None)
             for d in range(nd)]
    if s.shape[0] > 1:  # the scale rows of rows [start, start + len(q))
        b0, first = sizes[0], start // sizes[0]
        s = s[first: (start + q.shape[0] - 1) // b0 + 1]
        if b0 > 1:
            s = s.repeat_interleave(b0, dim=0)
        s = s[start - first * b0: start - first * b0 + q.shape[0]]
    for d in range(1, nd):
        if sizes[d] > 1 and s.shape[d] > 1:
            s = s.repeat_interleave(sizes[d], dim=d).narrow(d, 0, full_shape[d])
    return x.mul_(s)


def _block_size(size: int, grid: int, configured: int | None) -> int:
    """Elements per scale along one dim."""
    if grid == size:
        return 1
    if grid == 1:
        return size
    if configured:
        if math.ceil(size / configured) != grid:
            raise UserError(f"an FP8 scale grid of {grid} does not cover {size} elements in blocks of {configured}")
        return configured
    if size % grid:
        raise UserError(f"an FP8 scale grid of {grid} over {size} elements needs the block size: the config's "
                        "quantization_config.weight_block_size is missing")
    return size // grid


def iter_row_chunks(shape: tuple[int, ...], *, element_bytes: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """`(start, stop)` row ranges of dim 0 whose size stays within `chunk_bytes` (at least one row)."""
    if not shape:
        yield 0, 1
        return
    row = math.prod(shape[1:]) * element_bytes
    step = max(1, chunk_bytes // max(row, 1))
    for start in range(0, shape[0], step):
        yield start, min(shape[0], start + step)


def torch_dtype(st_dtype: str) -> torch.dtype:
    return _ST_DTYPES[st_dtype]
