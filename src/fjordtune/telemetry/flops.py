"""Model FLOPs per token and peak FLOPs per GPU: what turns tokens/s into an MFU estimate.

Model FLOPs, not hardware FLOPs: activation recomputation is not counted, and neither is attention's
score matmul (small at 1,024 tokens next to 6.6B active parameters). Per token and parameter: 2 FLOPs
forward, 2 backward for the input gradient, and 2 more for the weight gradient of trainable (LoRA)
parameters only: frozen weights get none. A routed expert's parameters count with the share of tokens
they see (experts per token / experts).
"""

from __future__ import annotations

from typing import Any

PEAK_BF16_TFLOPS = {
    # dense BF16 tensor-core peak per GPU, from the vendors' data sheets (SXM parts)
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "B200": 2250.0,
    "L40S": 362.0,
}


def peak_flops(device_name: str | None, override_tflops: float | None = None) -> float | None:
    """Peak BF16 FLOP/s of one GPU: `override_tflops` (telemetry.peak_tflops) if set, else by the NVML
    device name (PCIe H100s are slower than the table says: set it), else None (no MFU)."""
    if override_tflops:
        return override_tflops * 1e12
    if not device_name:
        return None
    upper = device_name.upper()
    if "H100" in upper and "PCIE" in upper:
        return 756e12
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in upper:
            return tflops * 1e12
    return None


def _num_experts(config: Any) -> tuple[int, int]:
    for name in ("n_routed_experts", "num_local_experts", "num_experts"):
        e = getattr(config, name, None)
        if isinstance(e, int) and e > 0:
            return e, int(getattr(config, "num_experts_per_tok", 0) or e)
    return 0, 0


def model_flops_per_token(model: Any) -> float:
    """Training FLOPs per token of `model` (LoRA: base frozen). Sizes are global under FSDP2 (a DTensor's
    `numel()` is the full tensor's), so every rank computes the same number."""
    config = getattr(model, "config", None)
    experts, per_token = _num_experts(config)
    total = 0.0
    for name, p in model.named_parameters():
        if "embed_tokens" in name:  # a lookup, not a matmul
            continue
        n = float(p.numel())
        if experts and ".experts." in f".{name}." and p.dim() >= 1 and p.shape[0] == experts:
            n *= per_token / experts
        total += n * (6.0 if p.requires_grad else 4.0)
    return total
