"""A peft LoRA adapter file as low-rank updates of named base weights, read one target at a time.

`LoraUpdates.open(adapter_dir, config)` checks the file against the model (every expected tensor present,
none unexpected, shapes equal) without reading it, then `update(target)` reads one target's A and B and
returns `W += scale * lhs @ rhs` in the weight's own layout, for a 2-D linear weight or a fused 3-D expert
stack. The file of the 119B adapter is 8 GiB in fp32: nothing reads it whole.

peft itself says how A and B combine: it wraps a copy of the architecture on the meta device (no memory),
and for fused experts its `ParamWrapper.get_delta_factors` gives the per-expert factors. Used by the TP
scorer's in-place merge (`eval/tp.py`) and the merged export (`export/merged.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fjordtune.errors import InternalError, UserError
from fjordtune.model.weights import canonical_name


@dataclass(frozen=True)
class LowRankUpdate:
    """`scale * lhs @ rhs`, shaped as the weight `target` (2-D, or batched over the experts of a 3-D stack)."""

    target: str
    lhs: torch.Tensor
    rhs: torch.Tensor
    scale: float

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.lhs.shape[:-1]) + tuple(self.rhs.shape[-1:])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows `[start, stop)` of dim 0 of the update, in float32 (experts, for a 3-D stack)."""
        lhs = self.lhs[start:stop].float()
        rhs = self.rhs[start:stop].float() if self.rhs.ndim == 3 else self.rhs.float()
        delta = torch.matmul(lhs, rhs).mul_(self.scale)
        if not torch.isfinite(delta).all():
            raise UserError(f"{self.target}: the LoRA update has NaN or inf values: the adapter seems to be broken")
        return delta


@dataclass
class LoraUpdates:
    """The targets of a checked adapter file; `update(target)` reads one of them."""

    adapter_dir: Path
    layers: dict[str, tuple[str, Any]]
    """target weight name -> (peft module name, the meta-device peft layer)"""
    _file: Any = None
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)

    @classmethod
    def open(cls, adapter_dir: str | Path, config: Any) -> LoraUpdates:
        from peft import PeftConfig, get_peft_model
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.layer import LoraLayer, ParamWrapper
        from peft.utils import get_peft_model_state_dict
        from safetensors import safe_open

        from fjordtune.model.load import quiet_peft_deprecations
        from fjordtune.model.weights import build_meta_model

        adapter_dir = Path(adapter_dir)
        weights = adapter_dir / "adapter_model.safetensors"
        if not weights.exists():
            raise UserError(f"{adapter_dir}: no adapter_model.safetensors (not a peft adapter folder?)")
        peft_config = PeftConfig.from_pretrained(str(adapter_dir))
        if peft_config.peft_type != "LORA":  # PeftType is a str enum
            raise UserError(f"{adapter_dir}: a {peft_config.peft_type} adapter; only LoRA merges into weights")
        extra = [k for k in ("modules_to_save", "trainable_token_indices") if getattr(peft_config, k, None)]
        if extra:
            raise UserError(f"{adapter_dir}: adapter sets {extra}: whole replaced modules do not merge into weights")
        skeleton = build_meta_model(config, dtype=torch.float32)
        with quiet_peft_deprecations():
            peft_model = get_peft_model(skeleton, peft_config, low_cpu_mem_usage=True)
        expected = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
        with safe_open(str(weights), "pt") as file:
            shapes = {k: tuple(file.get_slice(k).get_shape()) for k in file.keys()}  # noqa: SIM118 - not a mapping
        missing = sorted(set(expected) - set(shapes))
        unexpected = sorted(set(shapes) - set(expected))
        mismatched = sorted(k for k in set(shapes) & set(expected) if shapes[k] != tuple(expected[k].shape))
        if missing or unexpected or mismatched:
            raise UserError(f"{adapter_dir}: adapter does not match the base model: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}, other shapes {mismatched[:3]}")
        adapter = "default"
        layers: dict[str, tuple[str, Any]] = {}
        used: set[str] = set()
        for name, layer in peft_model.named_modules():
            if not (isinstance(layer, LoraLayer) and adapter in layer.lora_A):
                continue
            if type(layer) not in (LoraLinear, ParamWrapper) or layer.use_dora.get(adapter) \
                    or layer.lora_bias.get(adapter) or adapter in getattr(layer, "lora_variant", {}):
                raise UserError(f"{adapter_dir}: {canonical_name(name)}: a {type(layer).__name__} LoRA layer (DoRA, "
                                "bias or variant): only plain LoRA on linear layers and fused parameters merges")
            keys = (f"{name}.lora_A.weight", f"{name}.lora_B.weight")
            if not all(k in shapes for k in keys):
                raise InternalError(f"peft saves {canonical_name(name)}'s LoRA under other names than {keys}")
            used.update(keys)
            leaf = layer.parameter_name if isinstance(layer, ParamWrapper) else "weight"
            layers[f"{canonical_name(name)}.{leaf}"] = (name, layer)
        if set(shapes) - used:
            raise UserError(f"{adapter_dir}: tensors that are not LoRA A/B pairs: {sorted(set(shapes) - used)[:3]}")
        return cls(adapter_dir, layers)

    def __enter__(self) -> LoraUpdates:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._file = None

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def update(self, target: str) -> LowRankUpdate | None:
        """The update of weight `target`, its factors read from the file now; None if the adapter leaves it."""
        from peft.tuners.lora.layer import ParamWrapper

        if target not in self.layers:
            return None
        if self._file is None:
            from safetensors import safe_open

            self._file = self._stack.enter_context(safe_open(str(self.adapter_dir / "adapter_model.safetensors"), "pt"))
        name, layer = self.layers[target]
        adapter = "default"
        a, b = (self._file.get_tensor(f"{name}.lora_{x}.weight").to(torch.float32) for x in "AB")
        if isinstance(layer, ParamWrapper) and getattr(layer, "num_experts", 1) > 1:
            if not hasattr(layer, "get_delta_factors"):
                import peft

                raise UserError(f"peft {peft.__version__} has no ParamWrapper.get_delta_factors, which merging "
                                "fused-expert LoRA uses (peft 0.21.2 has it)")
            # peft's own layout of A and B over the experts, not re-derived here: lend it the real factors
            meta_a, meta_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            layer.lora_A[adapter].weight = torch.nn.Parameter(a, requires_grad=False)
            layer.lora_B[adapter].weight = torch.nn.Parameter(b, requires_grad=False)
            try:
                lhs, rhs, scale = layer.get_delta_factors(adapter)
            finally:
                layer.lora_A[adapter].weight, layer.lora_B[adapter].weight = meta_a, meta_b
        elif getattr(layer, "fan_in_fan_out", False):
            lhs, rhs, scale = a.T, b.T, layer.scaling[adapter]
        else:
            lhs, rhs, scale = b, a, layer.scaling[adapter]
        return LowRankUpdate(target, lhs.float(), rhs.float(), float(scale))
