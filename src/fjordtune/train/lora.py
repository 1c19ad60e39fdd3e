"""LoRA setup with an explicit coverage check.

The adapter published with the story trained only `o_proj`: its targets `[q,k,v,o]_proj` did not
exist in Mistral4's MLA attention and peft said nothing. Here every target must match something,
and the coverage is reported before a single step runs.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

import torch.nn as nn

from fjordtune.errors import UserError
from fjordtune.model.load import quiet_peft_deprecations


@dataclass(frozen=True)
class TargetCoverage:
    target: str
    kind: str  # "module" or "parameter"
    num_matched: int
    example: str | None
    impl: str = "peft"
    """How the adapter is computed: "peft", "grouped" (expert stacks, `train/expert_lora.py`), or
    "peft (<why grouped does not apply>)"."""


@dataclass(frozen=True)
class Coverage:
    targets: tuple[TargetCoverage, ...]
    num_trainable: int
    num_total: int

    def table(self) -> str:
        lines = ["LoRA coverage:", f"  {'target':<28} {'kind':<9} {'matched':>7}  {'impl':<8} example"]
        notes = []
        for t in self.targets:
            impl, _, why = t.impl.partition(" ")
            lines.append(f"  {t.target:<28} {t.kind:<9} {t.num_matched:>7}  {impl:<8} {t.example or '-'}")
            if why:
                notes.append(f"  {t.target}: {why.strip('()')}")
        lines += notes
        pct = 100 * self.num_trainable / max(self.num_total, 1)
        lines.append(f"  trainable {self.num_trainable:,} of {self.num_total:,} parameters ({pct:.3f}%)")
        return "\n".join(lines)


def check_coverage(model: nn.Module, *, target_modules: list[str], target_parameters: list[str]) -> list[TargetCoverage]:
    """Count what each LoRA target matches in `model`; raise if any target matches nothing."""
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    param_names = [n for n, p in model.named_parameters() if p.dim() >= 2]
    out, problems = [], []
    for target in target_modules:
        hits = [n for n in linear_names if n == target or n.endswith("." + target)]
        out.append(TargetCoverage(target, "module", len(hits), hits[0] if hits else None))
        if not hits:
            problems.append(_no_match(target, "lora.target_modules", linear_names))
    for target in target_parameters:
        hits = [n for n in param_names if n == target or n.endswith("." + target)]
        out.append(TargetCoverage(target, "parameter", len(hits), hits[0] if hits else None))
        if not hits:
            problems.append(_no_match(target, "lora.target_parameters", param_names))
    if problems:
        raise UserError(*problems, "an unmatched target would be skipped silently by peft; fix the names above")
    return out


def apply_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float, target_modules: list[str],
               target_parameters: list[str], expert_impl: str = "grouped") -> tuple[nn.Module, Coverage]:
    """Wrap `model` with peft LoRA after verifying that every target exists. With `expert_impl="grouped"`,
    adapters on fused expert stacks compute without forming W+BA (`train/expert_lora.py`)."""
    from peft import LoraConfig, get_peft_model

    from fjordtune.train.expert_lora import EXPERT_IMPLS, use_grouped

    if expert_impl not in EXPERT_IMPLS:
        raise UserError(f"lora.expert_impl: {expert_impl!r}: use one of {', '.join(EXPERT_IMPLS)}")
    targets = check_coverage(model, target_modules=target_modules, target_parameters=target_parameters)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules) or None,
        target_parameters=list(target_parameters) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with quiet_peft_deprecations():
        peft_model = get_peft_model(model, cfg)
    if expert_impl == "grouped" and target_parameters:
        impls = use_grouped(peft_model)
        targets = [t if t.kind != "parameter" else replace(t, impl=_impl_of(t.target, impls)) for t in targets]
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    if trainable == 0:
        raise UserError("LoRA produced no trainable parameters")
    return peft_model, Coverage(tuple(targets), trainable, total)


def _impl_of(target: str, impls: dict[str, str]) -> str:
    """One word for all the parameters `target` matched: "grouped" if every one is, else peft's and why."""
    mine = [v for name, v in impls.items() if name == target or name.endswith("." + target)]
    if mine and all(v == "grouped" for v in mine):
        return "grouped"
    why = next((v.removeprefix("peft: ") for v in mine if v != "grouped"), "not a wrapped expert stack")
    return f"peft ({why})"


def _no_match(target: str, key: str, names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    close = difflib.get_close_matches(target.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.4)
    hint = f" (close: {', '.join(close)})" if close else ""
    return f"{key}: {target!r} matches nothing in this model{hint}; available: {', '.join(leaves[:20])}"
