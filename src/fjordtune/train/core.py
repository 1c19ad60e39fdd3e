"""The training core: setup and step, runnable with or without Ray (torchrun, a GPU box, a test).

Setup order (after torchtune's LoRA recipe): load base weights and verify every key -> mark LoRA
trainable and check coverage -> activation checkpointing -> shard every decoder layer, then the root
-> optimizer over the adapters only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fjordtune.config.schema import JobSpec
from fjordtune.data.sft import Example, tokenize_row
from fjordtune.model.load import load_causal_lm, load_tokenizer
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
    """Holds the sharded LoRA model and its optimizer for one rank."""

    def __init__(self, job: JobSpec, *, model_dir: str, device: torch.device) -> None:
        self.job = job
        self.device = device
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.tokenizer = load_tokenizer(job.model.tokenizer or model_dir)
        torch.manual_seed(job.train.seed)
        base = load_causal_lm(model_dir, dtype=job.model.dtype, device="cpu")
        base.config.use_cache = False
        lora = job.lora
        self.model, self.coverage = apply_lora(
            base, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
            target_modules=lora.target_modules, target_parameters=lora.target_parameters,
        )
        for p in self.model.parameters():  # adapters train in fp32 on a bf16 base
            if p.requires_grad:
                p.data = p.data.float()
        self.model.to(device)
        if dist.is_initialized():
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(device.type, (self.world_size,))
            bf16 = job.model.dtype == "bfloat16"
            self.num_sharded_layers = shard_model(
                self.model, mesh=mesh,
                param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None,
                activation_checkpointing=job.train.activation_checkpointing,
            )
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=job.train.lr, weight_decay=job.train.weight_decay)
        self.step = 0

    def examples(self, rows: list[dict[str, Any]]) -> list[Example]:
        """Tokenize chat rows (read once by the driver with `read_rows`) for this model."""
        return [
            tokenize_row(r, self.tokenizer, max_seq_len=self.job.data.max_seq_len, chat_template=self.job.data.chat_template)
            for r in rows
        ]

    def lr_at(self, step: int) -> float:
        warm = self.job.train.warmup_steps
        return self.job.train.lr * (min(1.0, (step + 1) / warm) if warm else 1.0)

    def train_step(self, batch: dict[str, list[list[int]]]) -> StepResult:
        """One optimizer step on this rank's micro-batch; the loss is normalised over all ranks' tokens."""
        self.model.train()
        ids = torch.tensor(batch["input_ids"], device=self.device)
        labels = torch.tensor(batch["labels"], device=self.device)
        mask = torch.tensor(batch["attention_mask"], device=self.device)
        logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)
        loss_sum = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
        n_local = torch.tensor([(shift_labels != -100).sum().item()], dtype=torch.float64, device=self.device)
        n_total = n_local.clone()
        if dist.is_initialized():
            dist.all_reduce(n_total)  # gloo has no AVG: sum here, divide below
        # FSDP averages gradients over ranks; scaling by world/n_total makes the result the per-token
        # mean over every rank's tokens, independent of how tokens are split between ranks.
        (loss_sum * self.world_size / n_total.item()).backward()
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
