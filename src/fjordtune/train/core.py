"""The training core: setup and step, runnable with or without Ray (torchrun, a GPU box, a test).

Setup order (after torchtune's LoRA recipe), so that no rank ever holds the whole model: build the
model on the meta device -> LoRA, with its coverage checked -> activation checkpointing -> shard every
decoder layer, then the root -> allocate this rank's shards -> initialise the adapters -> optimizer
over the adapters only. The base weights are read afterwards (`load_base_weights`), each rank only its
own slices: a resumed run can read its checkpoint first, and a finished one never reads them at all.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fjordtune.config.schema import JobSpec
from fjordtune.data.sft import Example, tokenize_row
from fjordtune.model.checkpoint import WeightSource
from fjordtune.model.load import load_tokenizer
from fjordtune.model.weights import build_meta_model, init_adapters, materialize, verify_materialized
from fjordtune.train.fsdp import shard_model
from fjordtune.train.lora import apply_lora

log = logging.getLogger(__name__)


def _real_tokens(batch: dict[str, Any]) -> int:
    if "lengths" in batch:
        return int(sum(batch["lengths"]))
    if "attention_mask" in batch:
        return int(sum(map(sum, batch["attention_mask"])))
    return sum(len(r) for r in batch["input_ids"])


@dataclass
class StepResult:
    loss: float  # mean over label tokens of all ranks
    num_tokens: int  # label tokens of all ranks
    grad_norm: float
    lr: float
    num_input_tokens: int = 0  # real (non-padding) input tokens of all ranks


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak: allocated device memory on CUDA (what preflight predicts), else peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


class TrainerCore:
    """Holds the sharded LoRA model and its optimizer for one rank.

    `model_dir` is a local model folder (config, tokenizer, safetensors). The traced preflight passes a
    `config` instead, and `allocate=False` to measure `allocate` and `load_base_weights` itself.
    """

    def __init__(self, job: JobSpec, *, model_dir: str | None, device: torch.device, load_base: bool = True,
                 config: Any = None, allocate: bool = True) -> None:
        self.job = job
        self.device = device
        self.model_dir = model_dir
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.tokenizer = load_tokenizer(job.model.tokenizer or model_dir) if model_dir or job.model.tokenizer else None
        torch.manual_seed(job.train.seed)  # LoRA dropout; the adapters' init has its own per-name seeds
        if config is None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model_dir)
        base = build_meta_model(config, dtype=getattr(torch, job.model.dtype))
        base.config.use_cache = False
        lora = job.lora
        self.model, self.coverage = apply_lora(
            base, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
            target_modules=lora.target_modules, target_parameters=lora.target_parameters,
            expert_impl=lora.expert_impl,
        )
        for p in self.model.parameters():  # adapters train in fp32 on a bf16 base
            if p.requires_grad:
                p.data = p.data.float()
        if dist.is_initialized():
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(device.type, (self.world_size,))
            bf16 = job.model.dtype == "bfloat16"
            self.num_sharded_layers = shard_model(
                self.model, mesh=mesh,
                param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None,
                activation_checkpointing=job.train.activation_checkpointing,
                forward_prefetch=job.train.forward_prefetch,
            )
        elif job.train.activation_checkpointing:  # one process, no FSDP: the same recompute as the ranks
            from fjordtune.train.fsdp import decoder_layer_classes, enable_activation_checkpointing

            enable_activation_checkpointing(self.model, decoder_layer_classes(self.model))
        self.base_loaded = False
        self.optimizer: torch.optim.Optimizer | None = None
        self.step = 0
        from fjordtune.train.schedule import Schedule

        # `train_step` follows this; the training loop sets the run's real one (it needs the step count)
        self.schedule = Schedule("constant", job.train.lr, job.train.min_lr, job.train.warmup_steps or 0, 1)
        if allocate:
            self.allocate()
            if load_base:
                self.load_base_weights()

    def allocate(self) -> None:
        """Allocate this rank's shards (uninitialised base, initialised adapters) and the optimizer. Separate
        from `__init__` so that the traced preflight can measure it."""
        materialize(self.model, self.device)
        init_adapters(self.model, seed=self.job.train.seed)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=self.job.train.lr, weight_decay=self.job.train.weight_decay)

    def load_base_weights(self, model_dir: str | None = None, *, weights: WeightSource | None = None) -> None:
        """Read this rank's slices of the frozen base weights (every key checked, nothing left unloaded),
        from `model_dir` (default: the folder the core was built from), or from `weights`."""
        from fjordtune.model.weights import load_base_weights

        if weights is not None:
            load_base_weights(self.model, weights, where="<given weights>")
        else:
            from fjordtune.model.checkpoint import SafetensorsCheckpoint

            where = model_dir or self.model_dir
            with SafetensorsCheckpoint.open(where) as ckpt:
                load_base_weights(self.model, ckpt, where=str(where))
        verify_materialized(self.model)
        self.base_loaded = True

    def examples(self, rows: list[dict[str, Any]], *, max_seq_len: int | None = -1) -> list[Example]:
        """Tokenize chat rows (read once by the driver with `read_rows`) for this model, cut to
        `data.max_seq_len` (default) or to `max_seq_len` (None: whole, for `fit_length` to count)."""
        limit = self.job.data.max_seq_len if max_seq_len == -1 else max_seq_len
        return [tokenize_row(r, self.tokenizer, max_seq_len=limit, chat_template=self.job.data.chat_template)
                for r in rows]

    def lr_at(self, step: int) -> float:
        return self.schedule.lr_at(step)

    def _inputs(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Model inputs and labels of a collated micro-batch: packed rows carry position_ids and no attention
        mask (transformers then builds a block-diagonal causal mask, or varlen for flash-attention)."""
        keys = ("input_ids", "position_ids") if "position_ids" in batch else ("input_ids", "attention_mask")
        inputs = {k: torch.tensor(batch[k], device=self.device) for k in keys}
        return inputs, torch.tensor(batch["labels"], device=self.device)

    def _loss_sum(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        logits = self.model(**inputs).logits.float()
        shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)
        return torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")

    def _check_loaded(self) -> None:
        if not self.base_loaded:
            from fjordtune.errors import InternalError

            raise InternalError("a step before load_base_weights: the base model is uninitialised memory")

    def forward_backward(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, *,
                         num_tokens_total: float) -> torch.Tensor:
        """Forward and backward of this rank's micro-batch; returns the summed token loss (not normalised).

        FSDP averages gradients over ranks; scaling by world / tokens of all ranks makes the result the
        per-token mean over every rank's tokens, independent of how tokens are split between ranks and
        between the micro-batches of an accumulated step."""
        self._check_loaded()
        loss_sum = self._loss_sum(inputs, labels)
        (loss_sum * self.world_size / num_tokens_total).backward()
        return loss_sum.detach()

    def train_step(self, batch: dict[str, Any] | Sequence[dict[str, Any]]) -> StepResult:
        """One optimizer step on this rank's micro-batch, or on several whose gradients accumulate
        (`train.grad_accum_steps`); the loss is normalised over the label tokens of every micro-batch of
        every rank, so k micro-batches give the step that one k-times larger batch would."""
        self.model.train()
        micro = [batch] if isinstance(batch, dict) else list(batch)
        prepared = [self._inputs(b) for b in micro]
        n_local = sum(int((labels[:, 1:] != -100).sum().item()) for _, labels in prepared)
        n_input = sum(_real_tokens(b) for b in micro)
        counts = torch.tensor([n_local, n_input], dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(counts)  # gloo has no AVG: sum here, divide in forward_backward
        n_total = counts[0].item()
        loss_sum = sum(self.forward_backward(inputs, labels, num_tokens_total=max(n_total, 1.0))
                       for inputs, labels in prepared)
        grad_norm = self._clip()
        lr = self.lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        stats = torch.tensor([loss_sum.item()], dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(stats)
        return StepResult(stats.item() / max(n_total, 1.0), int(n_total), grad_norm, lr, int(counts[1].item()))

    @torch.no_grad()
    def eval_loss(self, batches: Sequence[dict[str, Any]]) -> tuple[float, int]:
        """Mean per-token loss over the label tokens of every rank's held-out batches (a collective: every
        rank passes the same number of batches; `eval_batches` arranges that). Returns (loss, tokens)."""
        self._check_loaded()
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for b in batches:
            inputs, labels = self._inputs(b)
            total[0] += self._loss_sum(inputs, labels).double()
            total[1] += int((labels[:, 1:] != -100).sum().item())
        if dist.is_initialized():
            dist.all_reduce(total)
        self.model.train(was_training)
        return total[0].item() / max(total[1].item(), 1.0), int(total[1].item())

    def rng_state(self) -> dict[str, Any]:
        """What this rank's randomness (LoRA dropout) needs to continue exactly after a resume."""
        import random

        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state: dict[str, Any]) -> None:
        import random

        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.job.train.grad_clip or math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    # -- checkpoints ---------------------------------------------------------------------------
    def save_resumable(self, directory: str | Path) -> None:
        """Adapter + optimizer state of this rank as a DCP shard (collective)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
        )

        msd, osd = get_state_dict(self.model, self.optimizer, options=StateDictOptions(ignore_frozen_params=True))
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(directory))

    def load_resumable(self, directory: str | Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
            set_state_dict,
        )

        opts = StateDictOptions(ignore_frozen_params=True)
        msd, osd = get_state_dict(self.model, self.optimizer, options=opts)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(directory))
        result = set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
            options=StateDictOptions(ignore_frozen_params=True, strict=False),
        )
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        missing_trainable = [k for k in result.missing_keys if k in trainable]
        if missing_trainable or result.unexpected_keys:
            from fjordtune.errors import UserError

            raise UserError(
                f"checkpoint {directory} does not match this adapter: missing {missing_trainable[:3]}, "
                f"unexpected {list(result.unexpected_keys)[:3]}"
            )

    def save_adapter(self, directory: str | Path) -> bool:
        """Gather the full adapter (collective) and write it in peft format on rank 0; True on rank 0."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        if dist.is_initialized():
            full = get_model_state_dict(
                self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
            )
        else:
            full = {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        if self.rank != 0:
            return False
        # adapters only: peft would add the frozen base weights of a targeted lm_head / embedding ("auto")
        self.model.save_pretrained(str(directory), state_dict=full, save_embedding_layers=False)
        self._verify_saved_adapter(Path(directory), expected=len(full))
        return True

    @staticmethod
    def _verify_saved_adapter(directory: Path, *, expected: int) -> None:
        """peft drops adapters it cannot attribute to a module (e.g. under renamed wrappers) without a
        word: count what reached the file."""
        from safetensors import safe_open

        from fjordtune.errors import InternalError

        with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
            saved = len(list(f.keys()))
        if saved != expected:
            raise InternalError(f"adapter save wrote {saved} of {expected} trainable tensors to {directory}")
