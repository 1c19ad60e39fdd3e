"""A merged model folder (base + LoRA adapter folded in), written a block of rows at a time.

`export_merged(model_dir, adapter_dir, out_dir)` reads the base checkpoint through the verified reader
(`model/checkpoint.py`: text-only or the released multimodal layout, bf16/fp32 or FP8 with its scales,
dequantized as read), adds each targeted weight's LoRA update (`model/adapter.py`: attention projections
and fused expert stacks, one target's factors in memory at a time), and streams the result into
safetensors shards of at most `shard_bytes`, then the index, the text model's config and the tokenizer
files. What it writes is a plain Hugging Face folder of the text model: standard key names, no peft
wrappers, `architectures` the causal LM class, no quantization config; transformers and vLLM load it
as they load any checkpoint.

Memory stays at one block of rows (`chunk_bytes` in fp32, and the same rows in the output dtype) plus
one target's LoRA factors and the meta-device skeleton: a shard is written tensor by tensor into a file
whose header is computed from the shapes first, so not even a shard is held whole.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fjordtune.errors import UserError
from fjordtune.model.checkpoint import INDEX_FILE, SafetensorsCheckpoint, iter_row_chunks
from fjordtune.model.weights import CHUNK_BYTES

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 5 * 10**9
"""Hugging Face's default `max_shard_size` ("5GB"): 48 shards for Mistral Small 4 in bf16."""
OUTPUT_DTYPES = {"bfloat16": (torch.bfloat16, "BF16"), "float16": (torch.float16, "F16"),
                 "float32": (torch.float32, "F32")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "tekken.json")


@dataclass(frozen=True)
class ExportSummary:
    out_dir: Path
    num_tensors: int
    num_merged: int
    """Weights that received a LoRA update."""
    num_shards: int
    total_bytes: int
    seconds: float

    def line(self) -> str:
        return (f"export: {self.num_tensors} tensors ({self.num_merged} with the adapter merged) in "
                f"{self.num_shards} shard(s), {self.total_bytes / 1e9:.2f} GB, {self.seconds:.1f} s -> {self.out_dir}")


def export_merged(model_dir: str | Path, adapter_dir: str | Path | None, out_dir: str | Path, *,
                  dtype: str = "bfloat16", shard_bytes: int = DEFAULT_SHARD_BYTES,
                  chunk_bytes: int = CHUNK_BYTES) -> ExportSummary:
    """Write `model_dir` with `adapter_dir` merged into `out_dir` (created; it must not exist or be empty).

    The folder appears complete or not at all: it is written under `<out_dir>.partial` and renamed last."""
    from transformers import AutoConfig

    from fjordtune.model.adapter import LoraUpdates
    from fjordtune.model.load import causal_lm_class
    from fjordtune.model.weights import build_meta_model, text_config

    if dtype not in OUTPUT_DTYPES:
        raise UserError(f"--dtype {dtype}: use one of {', '.join(OUTPUT_DTYPES)}")
    torch_dtype, st_dtype = OUTPUT_DTYPES[dtype]
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: exists and is not empty; export writes a new folder")
    t0 = time.perf_counter()
    config = text_config(AutoConfig.from_pretrained(str(model_dir)))
    skeleton = build_meta_model(config, dtype=torch.float32)
    with SafetensorsCheckpoint.open(model_dir) as ckpt:
        order = _tensor_order(skeleton, ckpt, where=str(model_dir))
        shards = _plan_shards(order, ckpt, element_bytes=torch_dtype.itemsize, shard_bytes=shard_bytes)
        updates = LoraUpdates.open(adapter_dir, config) if adapter_dir else None  # checked before any write
        if not any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES if f.startswith(("tokenizer", "tekken"))):
            raise UserError(f"{model_dir}: no tokenizer files: the merged folder would not load on its own")
        partial = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            total, merged = _write_shards(ckpt, shards, updates, partial, torch_dtype, st_dtype, chunk_bytes)
            _write_config(config, partial, architecture=causal_lm_class(config).__name__, dtype=dtype)
            _copy_tokenizer(Path(model_dir), partial)
            with SafetensorsCheckpoint.open(partial):  # the index, every shard and every header read back
                pass
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)  # nothing half-written is left to be mistaken for a model
            raise
        finally:
            if updates:
                updates.__exit__(None, None, None)
    if out_dir.exists():
        out_dir.rmdir()
    partial.rename(out_dir)
    return ExportSummary(out_dir, len(order), merged, len(shards), total, time.perf_counter() - t0)


def _write_shards(ckpt: SafetensorsCheckpoint, shards: list[list[str]], updates: Any, out: Path,
                  torch_dtype: torch.dtype, st_dtype: str, chunk_bytes: int) -> tuple[int, int]:
    """Every shard, then the index; returns (bytes written, weights with an update merged)."""
    merged = total = 0
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        shapes = {n: ckpt.sources[n].shape for n in names}
        t0 = time.perf_counter()
        with _ShardWriter(out / file, shapes, st_dtype, torch_dtype.itemsize) as writer:
            for name in names:
                update = updates.update(name) if updates else None
                if update is not None and update.shape != shapes[name]:
                    raise UserError(f"{updates.adapter_dir}: {name}: the update is {update.shape}, the weight "
                                    f"{shapes[name]}")
                for start, stop in iter_row_chunks(shapes[name], element_bytes=4, chunk_bytes=chunk_bytes):
                    rows = ckpt.read_rows(name, start, stop, dtype=torch.float32)
                    if update is not None:
                        rows += update.rows(start, stop)
                    writer.write(name, rows.to(torch_dtype))
                merged += update is not None
                weight_map[name] = file
        total += writer.nbytes
        ckpt.close()  # unmap the input files read so far: their pages count in this process's RSS while mapped
        log.info("export: shard %d/%d written (%.2f GB, %.1f s)", i, len(shards), writer.nbytes / 1e9,
                 time.perf_counter() - t0)
    if updates is not None and merged != len(updates.layers):
        raise UserError(f"{updates.adapter_dir}: {len(updates.layers) - merged} adapter target(s) are not weights "
                        f"of the checkpoint: {sorted(set(updates.layers) - set(weight_map))[:3]}")
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                             indent=2, sort_keys=True))
    return total, merged


def _tensor_order(skeleton: Any, ckpt: SafetensorsCheckpoint, *, where: str) -> list[str]:
    """The checkpoint's text-model tensors in the model's parameter order; every parameter must be there."""
    params = [n for n, _ in skeleton.named_parameters()]  # a tied lm_head is listed once, as the embedding
    missing = [n for n in params if n not in ckpt.sources]
    if missing:
        raise UserError(f"{where}: the checkpoint lacks {len(missing)} weight(s) of the model (first: {missing[0]})")
    known = set(params)
    extra = sorted(n for n in ckpt.sources if n not in known)
    state = set(skeleton.state_dict())  # a tied lm_head stored anyway, persistent buffers
    unknown = [n for n in extra if n not in state]
    if unknown:
        raise UserError(f"{where}: the checkpoint holds {len(unknown)} tensor(s) the model does not have (first: "
                        f"{unknown[0]}); a merged folder with them would not load")
    return params + extra


def _plan_shards(order: list[str], ckpt: SafetensorsCheckpoint, *, element_bytes: int,
                 shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in order:
        nbytes = math.prod(ckpt.sources[name].shape) * element_bytes
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


class _ShardWriter:
    """A safetensors file written tensor by tensor: the header (names, dtypes, shapes, offsets) first, from
    the shapes alone, then each tensor's bytes in header order, a block of rows at a time."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], st_dtype: str, itemsize: int) -> None:
        self.path, self.itemsize = path, itemsize
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        self.expected: dict[str, int] = {}
        for name, shape in shapes.items():
            nbytes = math.prod(shape) * itemsize
            header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.expected[name] = nbytes
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.header, self.nbytes = raw, offset
        self.order = list(shapes)
        self.written: dict[str, int] = {}

    def __enter__(self) -> _ShardWriter:
        self.file = open(self.path, "wb")  # noqa: SIM115 - closed in __exit__
        self.file.write(struct.pack("<Q", len(self.header)))
        self.file.write(self.header)
        return self

    def write(self, name: str, rows: torch.Tensor) -> None:
        position = len(self.written) - (name in self.written)
        if self.order[position] != name:
            raise RuntimeError(f"{self.path.name}: {name} written out of order (expected {self.order[position]})")
        data = rows.contiguous().reshape(-1).view(torch.uint8).numpy()
        self.file.write(data)
        self.written[name] = self.written.get(name, 0) + data.nbytes

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        self.file.close()
        if exc_type is None and self.written != self.expected:
            short = next(n for n in self.order if self.written.get(n) != self.expected[n])
            raise RuntimeError(f"{self.path.name}: {short}: wrote {self.written.get(short, 0)} of "
                               f"{self.expected[short]} bytes")


def _write_config(config: Any, out: Path, *, architecture: str, dtype: str) -> None:
    cfg = config.to_dict()
    for key in ("quantization_config", "_name_or_path"):
        cfg.pop(key, None)
    cfg["architectures"] = [architecture]
    cfg["dtype"] = dtype
    cfg.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _copy_tokenizer(model_dir: Path, out: Path) -> None:
    for f in (f for f in TOKENIZER_FILES if (model_dir / f).is_file()):
        shutil.copy2(model_dir / f, out / f)


def export_job(job: Any, *, adapter: str | None = None, out: str | None = None, dtype: str = "bfloat16",
               shard_bytes: int = DEFAULT_SHARD_BYTES, format: str = "merged", quant: str = "q4_k_m") -> tuple[str, Any]:
    """`fjordtune export JOB`: the job's base model (`model.path`, staged or cached as the run loads it) with
    `adapter` merged (default: the run's trained adapter, `<storage.uri>/<name>/adapter`), written to `out`
    (default `<storage.uri>/<name>/export/merged`, or `.../export/gguf-<quant>` for `format="gguf"`). An s3://
    destination is written next to the node cache (`storage.cache_dir`), then uploaded as one commit: readers
    see the whole folder or the previous one. Returns (where it went, the summary)."""
    import tempfile

    from fjordtune.export.gguf import export_gguf
    from fjordtune.model.load import local_model_dir, stage_base_model
    from fjordtune.storage.store import Store, cache_root

    store = Store.for_job(job)
    cache = cache_root(job.storage.cache_dir)
    adapter = adapter or f"{job.run_uri}/adapter"
    out = out or f"{job.run_uri}/export/" + ("merged" if format == "merged" else f"gguf-{quant}")
    if format == "gguf":
        from fjordtune.export.gguf import converter_dir

        converter_dir(cache)  # llama.cpp present and its converter at hand, before any merging
    if adapter.startswith("s3://") and not store.is_committed(adapter):
        raise UserError(f"--adapter {adapter}: no committed adapter there (has the run finished training?)")
    model_dir = local_model_dir(stage_base_model(job.model.path, run_uri=job.run_uri, store=store,
                                                 seed=job.model.seed), store=store, cache_root=cache)
    adapter_dir = local_model_dir(adapter, store=store, cache_root=cache)

    def write(dest: Path) -> Any:
        if format == "gguf":
            return export_gguf(model_dir, adapter_dir, dest, quant=quant, dtype=dtype, cache=cache, name=job.name)
        return export_merged(model_dir, adapter_dir, dest, dtype=dtype, shard_bytes=shard_bytes)

    if not out.startswith("s3://"):
        return out, write(Path(out))
    Path(cache).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="export-", dir=cache) as tmp:
        summary = write(Path(tmp) / "out")
        folder = Path(tmp) / "out"
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        log.info("export: uploading %.2f GB to %s", size / 1e9, out)
        store.upload_dir(folder, out, meta={"base_model": job.model.path, "adapter": adapter, "dtype": dtype,
                                            "format": format, **({"quant": quant} if format == "gguf" else {})})
    return out, summary
