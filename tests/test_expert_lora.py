"""Grouped expert LoRA (`lora.expert_impl: grouped`, `train/expert_lora.py`) against peft's own
`target_parameters` implementation: the same function, gradients and file, without the merged W+BA stacks.

Real models at toy size, fp32 on CPU. The two-rank FSDP2 equality and the peft reload of a trained adapter
are in tests/test_fsdp_gloo.py (the demo job uses the grouped implementation)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from fjordtune.train.expert_lora import GroupedExpertLoRA, _per_expert_mm, grouped_mm, use_grouped

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
JOB = Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml"


def _model(family: str, dtype: torch.dtype = torch.float32):
    """A tiny MoE causal LM of `family`: Mistral4 (fused [E, out, in] stacks), gpt-oss (transposed [E, in, out]
    stacks with biases, interleaved gate/up and its own clamped gate), Qwen3-MoE."""
    import transformers as T

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if family == "mistral4":
            from fjordtune.model.load import builtin_config

            return T.Mistral4ForCausalLM(builtin_config("tiny-mistral4", vocab_size=300))
        if family == "gpt_oss":
            return T.GptOssForCausalLM(T.GptOssConfig(
                vocab_size=300, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                layer_types=["full_attention"] * 2))
        return T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(
            vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2))
    finally:
        torch.set_default_dtype(previous)


def _peft(model, *, rank: int = 8):
    """peft LoRA on o_proj and the expert stacks, with every factor random (B = 0 would hide a wrong B)."""
    from peft import LoraConfig, get_peft_model

    from fjordtune.model.load import quiet_peft_deprecations

    with quiet_peft_deprecations():
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["o_proj"],
                                                 target_parameters=EXPERTS))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _run(model, ids: torch.Tensor) -> tuple[torch.Tensor, float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.item(), grads


@pytest.mark.parametrize("family", ["mistral4", "gpt_oss", "qwen3_moe"])
def test_grouped_equals_peft_in_outputs_loss_and_every_lora_gradient(family):
    reference = _peft(_model(family))
    grouped = copy.deepcopy(reference)  # the same initial adapter weights
    impls = use_grouped(grouped)
    assert impls and set(impls.values()) == {"grouped"}, impls
    assert sum(isinstance(m, GroupedExpertLoRA) for m in grouped.modules()) == 2  # one per layer's experts
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(2))
    logits_p, loss_p, grads_p = _run(reference, ids)
    logits_g, loss_g, grads_g = _run(grouped, ids)
    assert (logits_p - logits_g).abs().max() < 1e-5
    assert abs(loss_p - loss_g) < 1e-5
    assert grads_p.keys() == grads_g.keys() and any("experts" in n for n in grads_p)
    worst = max((grads_p[n] - grads_g[n]).abs().max().item() for n in grads_p)
    assert worst < 1e-5, worst
    # the experts' adapters matter in this check: without them the logits move
    with torch.no_grad(), reference.disable_adapter():
        base = reference(input_ids=ids).logits
    assert (base - logits_p).abs().max() > 1e-3


def test_grouped_keeps_no_merged_stack_for_backward():
    """peft saves W+BA ([E, 2I, H] and [E, H, I]) for backward; the grouped forward saves nothing of that size."""
    reference = _peft(_model("mistral4"))
    grouped = copy.deepcopy(reference)
    use_grouped(grouped)
    experts = reference.get_base_model().model.layers[0].mlp.experts.get_base_layer()
    stacks = {tuple(sorted(experts.gate_up_proj.shape)), tuple(sorted(experts.down_proj.shape))}
    ids = torch.randint(0, 300, (1, 64), generator=torch.Generator().manual_seed(3))

    def saved_non_parameters(model) -> list[torch.Tensor]:
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: list[torch.Tensor] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in params:
                seen.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids).loss.backward()
        return seen

    def stack_shaped(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t for t in tensors if t.dim() == 3 and tuple(sorted(t.shape)) in stacks]

    merged = stack_shaped(saved_non_parameters(reference))
    assert len(merged) >= 4, "peft no longer materialises W+BA: this comparison needs a new reference"
    assert not stack_shaped(saved_non_parameters(grouped))


def test_adapter_off_merged_and_saved_behave_as_in_peft(tmp_path):
    from peft import PeftModel

    reference = _peft(_model("mistral4"))
    grouped = copy.deepcopy(reference)
    use_grouped(grouped)
    ids = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        with grouped.disable_adapter():
            off = grouped(input_ids=ids).logits
        on = grouped(input_ids=ids).logits
        with reference.disable_adapter():
            assert (reference(input_ids=ids).logits - off).abs().max() < 1e-6
    # the same keys and tensors in peft's file format; a plain peft model loads them
    grouped.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(_model("mistral4"), str(tmp_path / "adapter"))
    assert not any(isinstance(m, GroupedExpertLoRA) for m in loaded.modules())
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - on).abs().max() < 1e-5
        merged = copy.deepcopy(grouped).merge_and_unload()
        assert (merged(input_ids=ids).logits - on).abs().max() < 1e-4


def test_modules_outside_the_experts_interface_keep_peft_and_say_why():
    model = _peft(_model("mistral4"))
    experts = model.get_base_model().model.layers[1].mlp.experts.get_base_layer()
    del experts.has_gate  # as an experts module written without transformers' interface would be
    impls = use_grouped(model)
    layer1 = {k: v for k, v in impls.items() if ".layers.1." in k}
    assert layer1 and all(v.startswith("peft: ") and "has_gate" in v for v in layer1.values()), layer1
    assert all(v == "grouped" for k, v in impls.items() if ".layers.0." in k)
    model = _peft(_model("mistral4"))
    model.get_base_model().model.layers[0].mlp.experts.get_base_layer()._is_expert_parallel = True
    assert "expert-parallel" in use_grouped(model)["base_model.model.model.layers.0.mlp.experts.gate_up_proj"]
    model = _peft(_model("mistral4"))
    stack = model.get_base_model().model.layers[0].mlp.experts.get_base_layer().down_proj
    stack.data = stack.data.to(torch.float8_e4m3fn)
    assert "float8" in use_grouped(model)["base_model.model.model.layers.0.mlp.experts.down_proj"]


def test_coverage_table_names_the_implementation_of_each_target(tiny_model_dir):
    from fjordtune.config import load_job
    from fjordtune.train.core import TrainerCore

    for impl in ("grouped", "peft"):
        core = TrainerCore(load_job(JOB, [f"lora.expert_impl={impl}"]), model_dir=str(tiny_model_dir),
                           device=torch.device("cpu"), load_base=False)
        rows = {line.split()[0]: line.split() for line in core.coverage.table().splitlines()[2:-1]}
        assert rows["mlp.experts.gate_up_proj"][3] == impl and rows["mlp.experts.down_proj"][3] == impl
        assert rows["o_proj"][3] == "peft"
        assert any(isinstance(m, GroupedExpertLoRA) for m in core.model.modules()) == (impl == "grouped")


def test_bf16_grouped_matches_peft_to_bf16_rounding():
    reference = _peft(_model("mistral4", torch.bfloat16))
    grouped = copy.deepcopy(reference)
    use_grouped(grouped)
    ids = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = reference(input_ids=ids).logits.float(), grouped(input_ids=ids).logits.float()
    assert (a - b).abs().max() < 0.05 * a.abs().max()


@pytest.mark.parametrize("out_dim", [16, 3])  # 3 fp32 columns: strides the grouped kernel refuses
def test_grouped_mm_and_its_per_expert_fallback_agree(out_dim):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(10, 8, generator=gen, requires_grad=True)
    w = torch.randn(4, 8, out_dim, generator=gen, requires_grad=True)
    offsets = torch.tensor([3, 3, 7, 9], dtype=torch.int32)  # expert 1 empty, the last row routed nowhere
    y = grouped_mm(x, w, offsets)
    ref = _per_expert_mm(x, w, offsets)
    expected = torch.cat([x[0:3] @ w[0], x[3:7] @ w[2], x[7:9] @ w[3]])
    assert (y[:9] - expected).abs().max() < 1e-5 and (ref[:9] - expected).abs().max() < 1e-5
    assert ref[9:].abs().max() == 0
    y[:9].sum().backward()  # a broadcast gradient, which the kernel's own backward refuses
    assert x.grad is not None and w.grad is not None and w.grad[1].abs().max() == 0


def test_gpu_check_script_runs_at_toy_size_on_cpu(tmp_path):
    """scripts/gpu_check_expert_lora.py is run on a lent GPU only; its code path is kept working here."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check_expert_lora.py"
    proc = subprocess.run([sys.executable, str(script), "--tiny", "--steps", "2", "--seq", "64", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "expert_lora.json").read_text())
    assert result["experts_module_max_diff"] < 0.05 * result["experts_module_scale"]
    assert len(result["peft"]["step_s"]) == len(result["grouped"]["step_s"]) == 2


def test_job_keys_name_their_choices():
    from fjordtune.config import load_job
    from fjordtune.errors import ConfigError

    job = load_job(JOB)
    assert job.lora.expert_impl == "grouped" and job.train.forward_prefetch == "explicit"
    with pytest.raises(ConfigError, match=r"lora\.expert_impl.*'peft' or 'grouped'"):
        load_job(JOB, ["lora.expert_impl=fast"])
    with pytest.raises(ConfigError, match=r"train\.forward_prefetch.*'explicit' or 'implicit'"):
        load_job(JOB, ["train.forward_prefetch=lazy"])
