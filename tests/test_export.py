"""`fjordtune export --format merged`: the adapter folded into the base weights, a shard at a time, written
as a plain Hugging Face folder that transformers loads on its own. Real tiny models, fp32 on CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

NUM_TARGETS = 7  # per layer: 5 attention projections and 2 expert stacks (conftest's make_adapter)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merged_export_equals_base_plus_adapter(tiny_model_dir, tmp_path, make_adapter):
    from peft import PeftModel
    from transformers import AutoTokenizer, Mistral4ForCausalLM

    from fjordtune.export.merged import export_merged
    from fjordtune.model.load import load_causal_lm

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "merged"
    summary = export_merged(tiny_model_dir, adapter, out, dtype="float32", shard_bytes=200_000)
    assert summary.num_shards > 1 and summary.num_merged == 2 * NUM_TARGETS
    assert not (tmp_path / "merged.partial").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("model-*.safetensors")}
    assert not any("lora" in k or "base_layer" in k for k in index["weight_map"])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Mistral4ForCausalLM"] and "quantization_config" not in config

    # transformers' own loader, nothing of ours: every key used, none missing
    merged, info = Mistral4ForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    reference = PeftModel.from_pretrained(load_causal_lm(str(tiny_model_dir), dtype="float32"), str(adapter))
    ids = torch.randint(0, merged.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    got, want = _logits(merged, ids), _logits(reference, ids)
    assert (got - want).abs().max() < 1e-5
    base = load_causal_lm(str(tiny_model_dir), dtype="float32")
    assert (_logits(base, ids) - want).abs().max() > 1e-3  # the adapter matters: the test can fail
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.apply_chat_template([{"role": "user", "content": "Hei"}], tokenize=False)


def test_export_refuses_what_would_not_load(tiny_model_dir, tmp_path, make_adapter):
    from fjordtune.errors import UserError
    from fjordtune.export.merged import export_merged

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        export_merged(tiny_model_dir, adapter, tmp_path / "busy")
    with pytest.raises(UserError, match="float64"):
        export_merged(tiny_model_dir, adapter, tmp_path / "out", dtype="float64")
    # an adapter for another model: refused before anything is written
    other = tmp_path / "other"
    (other).mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["r"] = 4
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    import shutil

    shutil.copy(adapter / "adapter_model.safetensors", other / "adapter_model.safetensors")
    with pytest.raises(UserError, match="does not match the base model"):
        export_merged(tiny_model_dir, other, tmp_path / "out2")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out2.partial").exists()


@pytest.fixture(scope="module")
def medium_model(tmp_path_factory):
    """A 0.6 GB fp32 Mistral4 (6 layers of 32 experts, hidden 512) in 100 MB shards, and a LoRA adapter on it."""
    from peft import LoraConfig, get_peft_model
    from transformers import Mistral4Config, Mistral4ForCausalLM

    from fjordtune.model.load import load_tokenizer, quiet_peft_deprecations

    out = tmp_path_factory.mktemp("medium-mistral4")
    tok = load_tokenizer("builtin:demo")
    cfg = Mistral4Config(vocab_size=len(tok), hidden_size=512, intermediate_size=1024, moe_intermediate_size=512,
                         num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=128,
                         kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32,
                         num_experts_per_tok=2, n_shared_experts=1, architectures=["Mistral4ForCausalLM"])
    torch.manual_seed(0)
    model = Mistral4ForCausalLM(cfg)
    model.save_pretrained(out / "model", max_shard_size="100MB")
    tok.save_pretrained(out / "model")
    with quiet_peft_deprecations():
        peft_model = get_peft_model(model, LoraConfig(
            r=16, lora_alpha=32, target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    peft_model.save_pretrained(out / "adapter")
    return out / "model", out / "adapter"


def test_export_peak_rss_stays_within_a_shard_and_a_layer(medium_model, tmp_path):
    """Measured in a fresh process: the peak RSS (`VmHWM`, mapped input pages included) stays under
    (largest shard + largest layer) x 1.5 + 512 MiB, while the model alone is 0.6 GB: an export that held the
    model, or kept every input file mapped, would pass that bound (this one did: 1.15 GiB before it unmapped
    the inputs after each shard)."""
    import subprocess
    import sys

    from safetensors import safe_open

    model_dir, adapter = medium_model
    out = tmp_path / "merged"
    shard_bytes = 50 * 10**6
    code = ("import json, sys, torch, transformers, peft, safetensors\n"
            "from fjordtune.export.merged import export_merged\n"
            "from fjordtune.telemetry.rss import status_bytes\n"
            f"s = export_merged({str(model_dir)!r}, {str(adapter)!r}, {str(out)!r}, shard_bytes={shard_bytes})\n"
            "print(json.dumps({'peak': status_bytes('VmHWM'), 'shards': s.num_shards}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    largest_shard = max(f.stat().st_size for f in [*model_dir.glob("*.safetensors"), *out.glob("*.safetensors")])
    layer = 0  # bytes of decoder layer 0 in fp32
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            layer += sum(math.prod(st.get_slice(k).get_shape()) * 4
                         for k in st.keys() if k.startswith("model.layers.0."))  # noqa: SIM118 - not a mapping
    model_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    bound = (largest_shard + layer) * 1.5 + 512 * 2**20
    assert result["shards"] > 1 and model_bytes > 0.55e9
    assert result["peak"] < bound, (result["peak"] / 2**20, bound / 2**20)


@pytest.mark.integration
def test_cli_exports_the_runs_adapter_to_s3_as_one_commit(s3_env, tmp_path, make_adapter):
    """`fjordtune export JOB` with a real S3 server: the builtin base is staged as a run stages it, the adapter is
    read from the bucket, and the merged folder is committed there; it loads in transformers alone."""
    import os
    import subprocess
    import sys

    from peft import PeftModel
    from transformers import Mistral4ForCausalLM

    from fjordtune.config import load_job
    from fjordtune.model.load import load_causal_lm, local_model_dir, stage_base_model
    from fjordtune.storage.store import Store

    root = Path(__file__).resolve().parents[1]
    store = Store()
    store.ensure_bucket("s3://fjt-export")
    sets = ["storage.uri=s3://fjt-export/runs", f"storage.cache_dir={tmp_path / 'cache'}"]
    job = load_job(root / "jobs" / "demo.yaml", sets)
    base = local_model_dir(stage_base_model(job.model.path, run_uri=job.run_uri, store=store, seed=job.model.seed),
                           store=store, cache_root=tmp_path / "cache")
    store.upload_dir(make_adapter(Path(base), tmp_path / "adapter"), f"{job.run_uri}/adapter")

    cmd = [sys.executable, "-m", "fjordtune", "export", str(root / "jobs" / "demo.yaml"), "--dtype", "float32",
           *sum((["--set", s] for s in sets), [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = f"{job.run_uri}/export/merged"
    assert f"-> {out}" in proc.stdout and "(14 with the adapter merged)" in proc.stdout
    assert store.is_committed(out)
    local = store.local_view(out, tmp_path / "view")
    merged = Mistral4ForCausalLM.from_pretrained(str(local), dtype=torch.float32)
    reference = PeftModel.from_pretrained(load_causal_lm(base, dtype="float32"), str(tmp_path / "adapter"))
    ids = torch.randint(0, merged.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(2))
    assert (_logits(merged, ids) - _logits(reference, ids)).abs().max() < 1e-5

    missing = subprocess.run([*cmd, "--adapter", "s3://fjt-export/runs/nothing-here"], capture_output=True, text=True,
                             timeout=600, env=os.environ)
    assert missing.returncode == 2 and "no committed adapter" in missing.stderr and "Traceback" not in missing.stderr
