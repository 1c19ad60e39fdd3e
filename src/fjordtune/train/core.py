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


@dataclass
class StepResult:
    loss: float  # mean over label tokens of all ranks
    num_tokens: int  # label tokens of all ranks
    grad_norm: float
    lr: float


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
            )
        self.base_loaded = False
        self.optimizer: torch.optim.Optimizer | None = None
        self.step = 0
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

    def examples(self, rows: list[dict[str, Any]]) -> list[Example]:
        """Tokenize chat rows (read once by the driver with `read_rows`) for this model."""
        return [
            tokenize_row(r, self.tokenizer, max_seq_len=self.job.data.max_seq_len, chat_template=self.job.data.chat_template)
            for r in rows
        ]

    def lr_at(self, step: int) -> float:
        warm = self.job.train.warmup_steps
        return self.job.train.lr * (min(1.0, (step + 1) / warm) if warm else 1.0)

    def forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor, *,
                         num_tokens_total: float) -> torch.Tensor:
        """Forward and backward of this rank's micro-batch; returns the summed token loss (not normalised).

        FSDP averages gradients over ranks; scaling by world / tokens of all ranks makes the result the
        per-token mean over every rank's tokens, independent of how tokens are split between ranks."""
        if not self.base_loaded:
            from fjordtune.errors import InternalError

            raise InternalError("train_step before load_base_weights: the base model is uninitialised memory")
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)
        loss_sum = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
        (loss_sum * self.world_size / num_tokens_total).backward()
        return loss_sum.detach()

    def train_step(self, batch: dict[str, list[list[int]]] | Sequence[dict[str, list[list[int]]]]) -> StepResult:
        """One optimizer step on this rank's micro-batch, or on several whose gradients accumulate; the loss
        is normalised over the tokens of every micro-batch of every rank."""
        self.model.train()
        micro = [batch] if isinstance(batch, dict) else list(batch)
        tensors = [tuple(torch.tensor(b[k], device=self.device) for k in ("input_ids", "labels", "attention_mask"))
                   for b in micro]
        n_local = sum(int((labels[:, 1:] != -100).sum().item()) for _, labels, _ in tensors)
        n_total = torch.tensor([n_local], dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(n_total)  # gloo has no AVG: sum here, divide in forward_backward
        loss_sum = sum(self.forward_backward(ids, labels, mask, num_tokens_total=n_total.item())
                       for ids, labels, mask in tensors)
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
        return StepResult(stats.item() / max(n_total.item(), 1.0), int(n_total.item()), grad_norm, lr)

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
        self.model.save_pretrained(str(directory), state_dict=full)
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
