"""Parameter counts of a causal LM built on the meta device, with the LoRA it would get.

`count_parameters` walks a model that holds no memory (built under `torch.device("meta")`), finds
its decoder layers generically, and applies peft's `LoraConfig` to a copy to count the adapter
exactly and to report which modules and parameters the targets really matched (the story trained
`o_proj` only because `[q,k,v,o]_proj` silently missed Mistral4's MLA projections).

The result, `ParamCounts`, holds plain ints, strings and tuples only: the analytic estimator in
`estimate.py` is a pure function of it, and it pickles across Ray processes. torch, transformers
and peft are imported inside functions, never at module load.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Shape = tuple[int, ...]
NamedShapes = tuple[tuple[str, Shape], ...]

# Expert-count field names seen across transformers' MoE configs.
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k", "moe_k")

_LAYER_INDEX = re.compile(r"\.\d+(?=\.|$)")


@dataclass(frozen=True, kw_only=True)
class LayerGroup:
    """Decoder layers with identical parameter shapes (e.g. all MoE layers, or the first-k dense ones)."""

    num_layers: int
    is_moe: bool
    num_params: int
    """Frozen base parameters of one layer."""
    param_shapes: NamedShapes
    """Frozen base parameters of one layer, names relative to the layer (FSDP pads dim 0 of each)."""
    expert_param_shapes: NamedShapes
    """Fused 3-D expert stacks ([experts, out, in] or similar), in declaration (= forward) order."""
    lora_params: int
    """LoRA parameters one layer of this group gets."""
    lora_shapes: NamedShapes
    lora_linear_in_features: tuple[int, ...]
    """`in_features` of every LoRA-wrapped linear module of one layer (peft saves its input in fp32)."""
    lora_expert_stacks: NamedShapes
    """Fused expert stacks wrapped through `target_parameters`: peft materialises W+BA for each."""
    lora_expert_params: int
    """LoRA parameters that belong to the wrapped expert stacks."""
    lora_groupable_stacks: tuple[str, ...] = ()
    """The wrapped stacks `lora.expert_impl: grouped` computes without W+BA (`train/expert_lora.py`)."""


@dataclass(frozen=True, kw_only=True)
class ParamCounts:
    """What the memory estimator needs to know about a model and its LoRA, as plain numbers."""

    architecture: str
    model_type: str
    layer_class: str
    total_params: int
    """Base parameters (frozen), counted once even when embeddings are tied."""
    num_layers: int
    layer_params: int
    """Parameters of the largest decoder layer."""
    embedding_params: int
    lm_head_params: int
    """0 when the output embedding is tied to the input embedding."""
    other_root_params: int
    """Parameters outside the decoder layers other than embedding and lm_head (final norm, ...)."""
    tied_embeddings: bool
    root_param_shapes: NamedShapes
    layer_groups: tuple[LayerGroup, ...]

    # dims the activation model needs
    hidden_size: int
    vocab_size: int
    num_attention_heads: int
    q_dim: int
    k_dim: int
    v_dim: int
    """Width of the stored value tensor (for MLA: the kv_b output holding k_nope and v)."""
    attn_out_dim: int
    latent_norm_dims: int
    """Widths of extra RMSNorms inside attention (MLA: q_lora_rank + kv_lora_rank)."""
    num_experts: int
    num_experts_per_tok: int
    expert_intermediate_size: int
    shared_expert_intermediate_size: int
    dense_intermediate_size: int

    # LoRA
    lora_rank: int
    lora_target_modules: tuple[str, ...]
    lora_target_parameters: tuple[str, ...]
    lora_params: int
    root_lora_shapes: NamedShapes
    num_lora_targets: int
    """Wrapped modules plus wrapped parameters (Mistral4 full coverage: 36 x (5 + 2) = 252)."""
    lora_matched_modules: tuple[str, ...]
    """Wrapped modules, layer index written as `*`: `model.layers.*.self_attn.o_proj`."""
    lora_matched_parameters: tuple[str, ...]
    """Wrapped parameters: `model.layers.*.mlp.experts.gate_up_proj`."""
    lora_unmatched_targets: tuple[str, ...]
    """Requested targets that matched nothing; peft skips them without a word."""
    lora_match_counts: tuple[tuple[str, int], ...] = ()
    """How many modules / parameters each matched name stands for (`o_proj`: 36)."""
    lora_grouped_impls: tuple[tuple[str, str], ...] = ()
    """For each wrapped parameter: "grouped" where `lora.expert_impl: grouped` applies, else "peft: <why>"."""

    @property
    def lora_params_per_layer(self) -> int:
        return max((g.lora_params for g in self.layer_groups), default=0)

    @property
    def expert_param_shapes(self) -> NamedShapes:
        """Fused expert stacks of the largest MoE layer (empty for dense models)."""
        moe = [g for g in self.layer_groups if g.expert_param_shapes]
        return max(moe, key=lambda g: g.num_params).expert_param_shapes if moe else ()

    @classmethod
    def from_config(cls, config: Any, *, lora_rank: int, lora_target_modules: Sequence[str] = (),
                    lora_target_parameters: Sequence[str] = ()) -> ParamCounts:
        """Build the model for `config` on the meta device and count it (no weights, no download)."""
        return count_parameters(meta_model_from_config(config), lora_rank=lora_rank,
                                lora_target_modules=lora_target_modules,
                                lora_target_parameters=lora_target_parameters)

    def lora_coverage(self, expert_impl: str = "grouped") -> str:
        """One paragraph saying what the LoRA targets really wrap, and how each wrapped parameter is computed
        under `expert_impl` (`lora.expert_impl`)."""
        lines = [f"LoRA r={self.lora_rank}: {self.lora_params:,} parameters on {self.num_lora_targets} targets"]
        counts = dict(self.lora_match_counts)
        impls = dict(self.lora_grouped_impls)
        lines += [f"  module     {n} (x{counts.get(n, '?')})" for n in self.lora_matched_modules]
        for n in self.lora_matched_parameters:
            status = impls.get(n, "peft: not an expert stack")
            impl = ("peft (lora.expert_impl: peft)" if expert_impl == "peft" else
                    "grouped" if status == "grouped" else f"peft ({status.removeprefix('peft: ')})")
            lines.append(f"  parameter  {n} (x{counts.get(n, '?')}), {impl}")
        if self.lora_unmatched_targets:
            lines.append(f"  matched nothing (peft skips these silently): {', '.join(self.lora_unmatched_targets)}")
        return "\n".join(lines)


def meta_model_from_config(config: Any, *, dtype: str = "bfloat16") -> Any:
    """The `*ForCausalLM` for `config`, built on the meta device with `dtype` parameters: the trainer's own
    `fjordtune.model.weights.build_meta_model`, so preflight counts exactly what training builds."""
    import torch

    from fjordtune.model.weights import build_meta_model

    return build_meta_model(config, dtype=getattr(torch, dtype))


def find_decoder_layers(model: Any) -> list[tuple[str, Any]]:
    """`(name, module)` of every decoder layer, in order.

    The layer class comes from transformers' `_no_split_modules`; without it, the largest
    `nn.ModuleList` whose children share one class is taken. Raises `ValueError` if neither exists.
    """
    from torch import nn

    classes = set(getattr(model, "_no_split_modules", None) or ())
    layers: list[tuple[str, Any]] = []
    if classes:
        for name, module in model.named_modules():
            if type(module).__name__ in classes and not any(name.startswith(n + ".") for n, _ in layers):
                layers.append((name, module))
    if not layers:
        best: tuple[int, str, Any] | None = None
        for name, module in model.named_modules():
            kids = list(module.children()) if isinstance(module, nn.ModuleList) else []
            if kids and len({type(k) for k in kids}) == 1:
                size = sum(p.numel() for p in module.parameters())
                if best is None or size > best[0]:
                    best = (size, name, module)
        if best is not None:
            layers = [(f"{best[1]}.{i}", m) for i, m in enumerate(best[2].children())]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers found (no _no_split_modules, no ModuleList)")
    return layers


def count_parameters(model: Any, *, lora_rank: int, lora_target_modules: Sequence[str] = (),
                     lora_target_parameters: Sequence[str] = ()) -> ParamCounts:
    """Count `model`'s parameters per decoder layer and root, and the LoRA the targets would add.

    `model` is a causal LM, ideally on the meta device; it is not modified (peft is applied to a
    copy). LoRA is counted by applying `LoraConfig(r=lora_rank, target_modules=...,
    target_parameters=...)` with `get_peft_model`, so fused expert stacks, nested parameter wrappers
    and silent mismatches come out exactly as training would see them.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = find_decoder_layers(model)
    layer_names = [n for n, _ in layers]
    in_layer = {id(p) for _, layer in layers for p in layer.parameters()}

    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb_w = getattr(emb, "weight", None)
    head_w = getattr(head, "weight", None)
    tied = emb_w is not None and head_w is emb_w
    embedding_params = emb_w.numel() if emb_w is not None else 0
    lm_head_params = 0 if tied or head_w is None else head_w.numel()
    root_shapes = tuple((n, tuple(p.shape)) for n, p in model.named_parameters() if id(p) not in in_layer)
    root_total = sum(_numel(s) for _, s in root_shapes)
    total = sum(p.numel() for p in model.parameters())

    # a single string is peft's regex / "all-linear" form: passed through, not checked name by name
    modules_arg: str | tuple[str, ...] = (
        lora_target_modules if isinstance(lora_target_modules, str) else tuple(lora_target_modules))
    lora = _apply_lora(model, layer_names, rank=lora_rank, target_modules=modules_arg,
                       target_parameters=tuple(lora_target_parameters))

    groups: dict[tuple, dict[str, Any]] = {}
    for name, layer in layers:
        shapes = tuple((n, tuple(p.shape)) for n, p in layer.named_parameters())
        experts = tuple((n, s) for n, s in shapes if len(s) == 3)
        is_moe = bool(experts) or any(".experts." in f".{n}" for n, _ in shapes)
        info = lora.per_layer.get(name, _LayerLora())
        key = (shapes, info.shapes, info.linear_in, info.expert_stacks, info.grouped_stacks)
        if key not in groups:
            stacks = tuple((n, s) for n, s in experts if n in info.expert_stacks)
            groups[key] = {"num_layers": 0, "is_moe": is_moe, "num_params": sum(_numel(s) for _, s in shapes),
                               "lora_groupable_stacks": tuple(n for n, _ in stacks if n in info.grouped_stacks),
                               "param_shapes": shapes, "expert_param_shapes": experts,
                               "lora_params": sum(_numel(s) for _, s in info.shapes), "lora_shapes": info.shapes,
                               "lora_linear_in_features": info.linear_in, "lora_expert_stacks": stacks,
                               "lora_expert_params": info.expert_params}
        groups[key]["num_layers"] += 1
    layer_groups = tuple(LayerGroup(**g) for g in groups.values())

    dims = _dims(config, layer_groups)
    return ParamCounts(
        architecture=type(model).__name__,
        model_type=str(getattr(config, "model_type", "")),
        layer_class=type(layers[0][1]).__name__,
        total_params=total,
        num_layers=len(layers),
        layer_params=max(g.num_params for g in layer_groups),
        embedding_params=embedding_params,
        lm_head_params=lm_head_params,
        other_root_params=root_total - embedding_params - lm_head_params,
        tied_embeddings=tied,
        root_param_shapes=root_shapes,
        layer_groups=layer_groups,
        lora_rank=lora_rank,
        lora_target_modules=(modules_arg,) if isinstance(modules_arg, str) else modules_arg,
        lora_target_parameters=tuple(lora_target_parameters),
        lora_params=lora.total,
        root_lora_shapes=lora.root_shapes,
        num_lora_targets=lora.num_targets,
        lora_matched_modules=lora.matched_modules,
        lora_matched_parameters=lora.matched_parameters,
        lora_unmatched_targets=lora.unmatched,
        lora_match_counts=lora.match_counts,
        lora_grouped_impls=lora.grouped_impls,
        **dims,
    )


@dataclass(frozen=True)
class _LayerLora:
    shapes: NamedShapes = ()
    linear_in: tuple[int, ...] = ()
    expert_stacks: tuple[str, ...] = ()
    expert_params: int = 0
    grouped_stacks: tuple[str, ...] = ()


@dataclass(frozen=True)
class _LoraSummary:
    total: int = 0
    per_layer: dict[str, _LayerLora] | None = None
    root_shapes: NamedShapes = ()
    num_targets: int = 0
    matched_modules: tuple[str, ...] = ()
    matched_parameters: tuple[str, ...] = ()
    unmatched: tuple[str, ...] = ()
    match_counts: tuple[tuple[str, int], ...] = ()
    grouped_impls: tuple[tuple[str, str], ...] = ()


def _apply_lora(model: Any, layer_names: list[str], *, rank: int, target_modules: str | tuple[str, ...],
                target_parameters: tuple[str, ...]) -> _LoraSummary:
    if rank < 0:
        raise ValueError(f"lora_rank must be >= 0, got {rank}")
    if rank == 0 or not (target_modules or target_parameters):
        return _LoraSummary(per_layer={})
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    work = copy.deepcopy(model)
    on_meta = all(p.is_meta for p in work.parameters())
    cfg = LoraConfig(r=rank, target_parameters=list(target_parameters) or None,
                     target_modules=target_modules if isinstance(target_modules, str) else list(target_modules) or None)
    from fjordtune.model.load import quiet_peft_deprecations

    try:
        with quiet_peft_deprecations():
            if on_meta:  # adapters on meta too: a real init of 2B expert-LoRA weights takes seconds and GBs
                with torch.device("meta"):
                    peft_model = get_peft_model(work, cfg)
            else:
                peft_model = get_peft_model(work, cfg)
    except ValueError as e:
        if "found" not in str(e):  # "Target modules {...} not found", "no `target_parameters` found"
            raise
        # nothing at all matched: report every target as unmatched and let the caller refuse
        listed = () if isinstance(target_modules, str) else target_modules
        return _LoraSummary(per_layer={}, unmatched=listed + target_parameters or ("<no target matched>",))
    base = peft_model.get_base_model()
    from fjordtune.train.expert_lora import use_grouped

    def owner(path: str) -> str | None:
        return next((n for n in layer_names if path == n or path.startswith(n + ".")), None)

    grouped: dict[str, list[str]] = {}
    impls: dict[str, str] = {}
    for path, status in use_grouped(base).items():  # on this throwaway copy: which stacks grouped serves
        canon = _canonical(path)
        impls[_LAYER_INDEX.sub(".*", canon)] = status
        layer = owner(canon)
        if status == "grouped" and layer is not None:
            grouped.setdefault(layer, []).append(canon[len(layer) + 1:])

    shapes: dict[str, list[tuple[str, Shape]]] = {}
    linear_in: dict[str, list[int]] = {}
    stacks: dict[str, list[str]] = {}
    expert_params: dict[str, int] = {}
    root_shapes: list[tuple[str, Shape]] = []
    modules, params = set(), set()  # with the layer index written as "*", for reporting
    concrete: list[str] = []  # real names, for matching targets the way peft does
    concrete_params: list[str] = []
    num_targets = 0
    for path, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        num_targets += 1
        canon = _canonical(path)
        layer = owner(canon)
        numel = sum(p.numel() for n, p in module.named_parameters(recurse=True)
                    if "lora_" in n and not n.startswith("base_layer."))
        if isinstance(module, ParamWrapper):
            params.add(_LAYER_INDEX.sub(".*", f"{canon}.{module.parameter_name}"))
            concrete_params.append(f"{canon}.{module.parameter_name}")
            if layer is not None:
                rel = canon[len(layer) + 1:]
                stacks.setdefault(layer, []).append(f"{rel}.{module.parameter_name}" if rel else module.parameter_name)
                expert_params[layer] = expert_params.get(layer, 0) + numel
        else:
            modules.add(_LAYER_INDEX.sub(".*", canon))
            concrete.append(canon)
            if layer is not None and getattr(module, "in_features", None):
                linear_in.setdefault(layer, []).append(int(module.in_features))
    for path, p in base.named_parameters():
        if "lora_" not in path:
            continue
        name = path.replace(".default.", ".")
        layer = owner(_canonical(path))
        if layer is None:
            root_shapes.append((name, tuple(p.shape)))
        else:
            shapes.setdefault(layer, []).append((name[len(layer) + 1:], tuple(p.shape)))
    per_layer = {
        name: _LayerLora(shapes=tuple(shapes.get(name, ())), linear_in=tuple(linear_in.get(name, ())),
                         expert_stacks=tuple(stacks.get(name, ())), expert_params=expert_params.get(name, 0),
                         grouped_stacks=tuple(grouped.get(name, ())))
        for name in layer_names
    }
    total = sum(p.numel() for n, p in base.named_parameters() if "lora_" in n)
    listed = () if isinstance(target_modules, str) else target_modules
    unmatched = tuple(t for t in listed if not any(_matches(m, t) for m in concrete))
    unmatched += tuple(t for t in target_parameters if not any(_matches(m, t) for m in concrete_params))
    tally: dict[str, int] = {}
    for name in concrete + concrete_params:
        pattern = _LAYER_INDEX.sub(".*", name)
        tally[pattern] = tally.get(pattern, 0) + 1
    return _LoraSummary(total=total, per_layer=per_layer, root_shapes=tuple(root_shapes), num_targets=num_targets,
                        matched_modules=tuple(sorted(modules)), matched_parameters=tuple(sorted(params)),
                        unmatched=unmatched, match_counts=tuple(sorted(tally.items())),
                        grouped_impls=tuple(sorted(impls.items())))


def _canonical(path: str) -> str:
    """Drop peft's wrapper segments: `mlp.experts.base_layer.lora_A.default.weight` -> `mlp.experts.lora_A.weight`."""
    parts = [p for p in path.split(".") if p not in ("base_layer", "default")]
    return ".".join(parts)


def _matches(name: str, target: str) -> bool:
    """peft's rule for list targets: the whole name or a dotted suffix."""
    return name == target or name.endswith("." + target)


def _numel(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _first(config: Any, names: Sequence[str], default: int = 0) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return default


def _dims(config: Any, groups: tuple[LayerGroup, ...]) -> dict[str, int]:
    """Dimensions for the activation model, read from the config with per-family fallbacks."""
    hidden = _first(config, ("hidden_size", "d_model", "n_embd"))
    heads = _first(config, ("num_attention_heads", "n_head"), 1)
    kv_heads = _first(config, ("num_key_value_heads",), heads) or heads
    kv_lora = getattr(config, "kv_lora_rank", None)
    if kv_lora:  # multi-head latent attention (DeepSeek-V2/V3, Mistral4)
        nope = _first(config, ("qk_nope_head_dim",))
        rope = _first(config, ("qk_rope_head_dim",))
        v_head = _first(config, ("v_head_dim",), nope + rope)
        q_dim = k_dim = heads * (nope + rope)
        v_dim = heads * (nope + v_head)
        out_dim = heads * v_head
        latent = (getattr(config, "q_lora_rank", None) or 0) + kv_lora
    else:
        head_dim = _first(config, ("head_dim",), hidden // max(heads, 1)) or hidden // max(heads, 1)
        q_dim = out_dim = heads * head_dim
        k_dim = v_dim = kv_heads * head_dim
        latent = 0
    num_experts = _first(config, EXPERT_COUNT_FIELDS)
    top_k = _first(config, TOP_K_FIELDS, 1 if num_experts else 0)
    dense_inter = _first(config, ("intermediate_size", "ffn_dim", "n_inner"), 4 * hidden)
    expert_inter = _first(config, ("moe_intermediate_size", "expert_intermediate_size"), dense_inter)
    stacks = next((g.expert_param_shapes for g in groups if g.expert_param_shapes), ())
    for name, shape in stacks:  # the fused stacks are the ground truth where present
        if "down" in name or name.endswith("w2"):
            expert_inter = next((d for d in shape[1:] if d != hidden), expert_inter)
            break
    shared = _first(config, ("shared_expert_intermediate_size",))
    if not shared:
        shared = _first(config, ("n_shared_experts", "num_shared_experts")) * expert_inter
    return {"hidden_size": hidden, "vocab_size": _first(config, ("vocab_size",)), "num_attention_heads": heads,
                "q_dim": q_dim, "k_dim": k_dim, "v_dim": v_dim, "attn_out_dim": out_dim, "latent_norm_dims": latent,
                "num_experts": num_experts, "num_experts_per_tok": top_k, "expert_intermediate_size": expert_inter,
                "shared_expert_intermediate_size": shared, "dense_intermediate_size": dense_inter}
