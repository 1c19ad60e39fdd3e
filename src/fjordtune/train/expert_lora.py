"""LoRA on fused expert stacks without ever forming the merged stacks W + B·A.

peft reaches fused 3-D expert parameters (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj`
[E, H, I]) only through `target_parameters`, and computes them by swapping the parameter for
W + scale·B·A during the forward: for Mistral Small 4 that is a 4 GiB and a 2 GiB bf16 tensor per
layer, which autograd keeps for the backward, and whose full-size gradient backward then computes
before reducing it to the factors. The arithmetic does not need either: per expert e,

    x @ (W_e + s·B_e·A_e)^T = x @ W_e^T + s·(x @ A_e^T) @ B_e^T

so the routed rows are sorted by expert once and three grouped matrix multiplies per projection do
the work (the base one with the frozen stack, two thin ones of rank r with the factors). Autograd
then keeps only the rows' inputs and their rank-r products, and the factors' gradients are the
size of the factors.

The adapter stays peft's: the same `ParamWrapper` modules, parameter names and layouts (`lora_A`
[r·E, in], `lora_B` [out, r·E]), so saving, loading, merging and FSDP2 sharding are peft's and
the file loads with `PeftModel.from_pretrained`. Only the forward of the outermost wrapper on an
experts module changes (`use_grouped`), and only where it is provably the same function:

- the experts module follows transformers' generic experts interface (`use_experts_implementation`:
  `has_gate`, `is_transposed`, `has_bias`, `_apply_gate`), without expert parallelism;
- every wrapped parameter of it is one of its projection stacks (`gate_up_proj` / `up_proj`,
  `down_proj`), and one adapter is active, unmerged.

Anything else keeps peft's forward (`reason_not_grouped` says why), and the coverage table shows
which implementation each target got. Dropout on the input is impossible here as in peft (the
input cannot be factored out); peft refuses it for `target_parameters` already.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

EXPERT_IMPLS = ("peft", "grouped")
PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")
GROUPED_MM_ALIGNMENT = 16
"""Bytes: `torch.nn.functional.grouped_mm` wants every stride but the unit one a multiple of this."""


@dataclass(frozen=True)
class ExpertFactors:
    """One expert stack's LoRA as grouped-mm operands: `x @ a_t[e]` then `@ b_t[e]`, times `scale`."""

    a_t: torch.Tensor  # [E, in, r]
    b_t: torch.Tensor  # [E, r, out]
    scale: float


def expert_factors(wrapper: Any, adapter: str, dtype: torch.dtype) -> ExpertFactors:
    """The factors of `wrapper`'s `adapter` in peft's layout, cast to `dtype` (the stack's, as peft does).

    peft keeps `lora_A.weight` as [r·E, in] with rows expert-major (row e·r + j) and `lora_B.weight`
    as [out, r·E] with columns rank-major (column j·E + e); both orientations of the stack (transposed
    or not) give the same per-expert product `(x @ A_e^T) @ B_e^T`.
    """
    a = wrapper.lora_A[adapter].weight
    b = wrapper.lora_B[adapter].weight
    num_experts = wrapper.num_experts
    a_t = a.reshape(num_experts, -1, a.shape[-1]).transpose(1, 2).to(dtype)  # [E, in, r], a view when no cast
    b_t = b.reshape(b.shape[0], -1, num_experts).permute(2, 1, 0).to(dtype).contiguous()  # [E, r, out]
    return ExpertFactors(a_t, b_t, float(wrapper.scaling[adapter]))


def reason_not_grouped(wrapper: Any) -> str | None:
    """Why the grouped forward cannot stand in for peft's on the experts module `wrapper` adapts, or None."""
    base = wrapper.get_base_layer()
    missing = [a for a in ("has_gate", "is_transposed", "has_bias", "num_experts") if not hasattr(base, a)]
    if missing:
        return f"{type(base).__name__} does not follow transformers' experts interface (no {', '.join(missing)})"
    if getattr(base, "_is_expert_parallel", False):
        return f"{type(base).__name__} is expert-parallel"
    if getattr(base, "has_post_expert_norm", False) and not hasattr(base, "post_expert_norm"):
        return f"{type(base).__name__} declares a post-expert norm it does not have"
    first = "gate_up_proj" if base.has_gate else "up_proj"
    for w in _chain(wrapper):
        if w.parameter_name not in (first, "down_proj"):
            return f"{w.parameter_name} is not one of {type(base).__name__}'s projection stacks ({first}, down_proj)"
        stack = getattr(base, w.parameter_name)
        if stack.dim() != 3:
            return f"{w.parameter_name} is not a 3-D expert stack"
        if stack.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"{w.parameter_name} is stored in {stack.dtype} (peft upcasts low-precision stacks)"
        if getattr(w, "num_experts", 0) != base.num_experts:
            return f"{w.parameter_name}: the adapter has {getattr(w, 'num_experts', 0)} experts, the module " \
                   f"{base.num_experts}"
    return None


def use_grouped(model: torch.nn.Module) -> dict[str, str]:
    """Give every outermost peft `ParamWrapper` on an experts module the grouped forward, where it applies.

    Returns {`<module path>.<parameter>`: "grouped" or "peft: <why>"} for every wrapped parameter.
    Call after `get_peft_model` and before `fully_shard` (it only changes the wrappers' class).
    """
    from peft.tuners.lora.layer import ParamWrapper

    out: dict[str, str] = {}
    for path, module in model.named_modules():
        if not isinstance(module, ParamWrapper) or isinstance(module, GroupedExpertLoRA) or _is_wrapped(model, path):
            continue
        reason = reason_not_grouped(module)
        if reason is None:
            module.__class__ = GroupedExpertLoRA
        for w in _chain(module):
            out[f"{path}.{w.parameter_name}"] = "grouped" if reason is None else f"peft: {reason}"
    return out


def _is_wrapped(model: torch.nn.Module, path: str) -> bool:
    from peft.tuners.lora.layer import ParamWrapper

    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    return isinstance(parent, ParamWrapper)


def _chain(wrapper: Any) -> list[Any]:
    """`wrapper` and the ParamWrappers nested inside it (peft nests one per targeted parameter)."""
    from peft.tuners.lora.layer import ParamWrapper

    chain = [wrapper]
    while isinstance(chain[-1].base_layer, ParamWrapper):
        chain.append(chain[-1].base_layer)
    return chain


def _peft_class() -> type:
    from peft.tuners.lora.layer import ParamWrapper

    return ParamWrapper


class GroupedExpertLoRA(_peft_class()):  # type: ignore[misc]
    """peft's `ParamWrapper` (outermost on an experts module) whose forward never forms W + B·A."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        chain = _chain(self)
        if (self.disable_adapters or kwargs.get("adapter_names") is not None
                or any(w.merged for w in chain)):
            return super().forward(x, *args, **kwargs)  # peft's own handling of these states
        factors: dict[str, ExpertFactors] = {}
        base = self.get_base_layer()
        for w in chain:
            active = [a for a in w.active_adapters if a in w.lora_A]
            if len(active) > 1:  # several adapters at once: peft sums their deltas
                return super().forward(x, *args, **kwargs)
            if active:
                factors[w.parameter_name] = expert_factors(w, active[0], getattr(base, w.parameter_name).dtype)
        return grouped_experts_forward(base, x, *args, factors=factors, **kwargs)


def grouped_experts_forward(experts: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor, *, factors: dict[str, ExpertFactors]) -> torch.Tensor:
    """The experts module's function (transformers' generic interface) with LoRA on its stacks.

    hidden_states [T, H]; top_k_index, top_k_weights [T, k]. Rows are sorted by expert once; each
    projection is a grouped matrix multiply over contiguous runs of rows.
    """
    num_tokens, hidden = hidden_states.shape
    k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    sorted_ids = expert_ids[order]
    # end offset of each expert's run; fixed size, so it also works on fake tensors (traced preflight)
    bounds = torch.arange(1, experts.num_experts + 1, device=sorted_ids.device, dtype=sorted_ids.dtype)
    offsets = torch.searchsorted(sorted_ids, bounds).to(torch.int32)
    rows = hidden_states[order // k]

    first = "gate_up_proj" if experts.has_gate else "up_proj"
    h = _project(experts, first, rows, offsets, sorted_ids, factors.get(first))
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    out = _project(experts, "down_proj", h, offsets, sorted_ids, factors.get("down_proj"))
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    # the routing weights' dtype (fp32 for Mistral4's router) carries into the sum over the k experts,
    # as in transformers' own grouped forward
    out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1)
    unsort = torch.empty_like(order)
    unsort[order] = torch.arange(order.numel(), device=order.device)
    return out[unsort].view(num_tokens, k, hidden).sum(dim=1).to(hidden_states.dtype)


def _project(experts: Any, name: str, x: torch.Tensor, offsets: torch.Tensor, sorted_ids: torch.Tensor,
             lora: ExpertFactors | None) -> torch.Tensor:
    weight = getattr(experts, name)
    weight_t = weight if experts.is_transposed else weight.transpose(-2, -1)  # [E, in, out], a view
    y = grouped_mm(x.to(weight.dtype), weight_t, offsets)
    if lora is not None:
        xa = grouped_mm(x.to(lora.a_t.dtype), lora.a_t, offsets)
        y = y + lora.scale * grouped_mm(xa, lora.b_t, offsets)
    if experts.has_bias:
        y = y + getattr(experts, f"{name}_bias")[sorted_ids]
    return y


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """rows x[offsets[e-1]:offsets[e]] @ w[e] for every expert e: [S, in] x [E, in, out] -> [S, out].

    torch's grouped kernel where it takes the operands (CPU in any float dtype; CUDA in bf16 on
    sm80+; 16-byte-aligned strides), else one matmul per expert.
    """
    if _kernel_takes(x, w):
        return _ContiguousGrad.apply(F.grouped_mm(x, w, offs=offsets))
    return _per_expert_mm(x, w, offsets)


def _kernel_takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    if w.device.type == "cuda":
        if w.dtype != torch.bfloat16 or torch.cuda.get_device_capability(w.device) < (8, 0):
            return False
    elif w.device.type != "cpu":
        return False
    size = w.element_size()
    return all(s * size % GROUPED_MM_ALIGNMENT == 0 for t in (x, w) for s in t.stride() if s != 1)


def _per_expert_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    parts = [x[s:e] @ w[i] for i, (s, e) in enumerate(zip(starts, ends)) if e > s]
    tail = x.shape[0] - (ends[-1] if ends else 0)
    if tail:
        parts.append(x.new_zeros(tail, w.shape[-1]))
    return torch.cat(parts) if parts else x.new_zeros(0, w.shape[-1])


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a dense gradient: grouped_mm's backward refuses the broadcast
    (stride 0) gradients that a plain `.sum()` produces."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()
