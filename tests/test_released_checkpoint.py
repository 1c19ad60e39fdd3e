"""The released Mistral Small 4 layout, at toy size: `Mistral3ForConditionalGeneration` keys, a small
vision tower and projector, FP8 weights with their scales, in several shards with an index.

It must load through the same sharded path as any checkpoint (two gloo ranks, each reading only its
slices and dequantizing them), with logits equal to the same weights dequantized by hand, and the
log must say how many vision tensors it skipped. Also: the one-line errors for broken folders."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import fjordtune
from fjordtune.errors import UserError
from fjordtune.model.checkpoint import SafetensorsCheckpoint, dequantize_rows

ROOT = Path(fjordtune.__file__).resolve().parents[2]
JOB = ROOT / "jobs" / "demo.yaml"
BLOCK = 16  # smaller than the toy dims, so partial edge blocks occur (kv_a_proj_with_mqa has 24 rows)
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
IDS = [[5, 17, 99, 1200, 3, 44, 8, 1999, 250, 7]]


def _quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 with one scale per BLOCK x BLOCK block of the last two dims (what transformers' fine-grained FP8
    stores as `weight_scale_inv`)."""
    *lead, rows, cols = w.shape
    grid = (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))
    scale = torch.empty(*lead, *grid)
    q = torch.empty(w.shape, dtype=FP8)
    for i in range(grid[0]):
        for j in range(grid[1]):
            block = w[..., i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].float()
            s = block.abs().amax(dim=(-1, -2)).clamp(min=1e-12) / FP8_MAX
            scale[..., i, j] = s
            q[..., i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = (block / s[..., None, None]).to(FP8)
    return q, scale


def _dequantize_by_hand(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Block by block, independently of the loader's vectorised version."""
    out = q.float()
    if scale.dim() == 0:
        return out * scale
    for i in range(scale.shape[-2]):
        for j in range(scale.shape[-1]):
            out[..., i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] *= scale[..., i, j][..., None, None]
    return out


def _is_quantized(key: str, t: torch.Tensor) -> bool:
    """As the release: FP8 for the text model's projections and experts; embeddings, norms, the router,
    lm_head, the vision tower and the projector stay bf16."""
    text = key.startswith("model.language_model.layers.")
    return text and t.dim() >= 2 and ".mlp.gate." not in key and "layernorm" not in key


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(folder, the same text weights dequantized by hand as a text-model state dict in bf16)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from fjordtune.model.load import builtin_config, load_tokenizer

    tok = load_tokenizer("builtin:demo")
    text = builtin_config("tiny-mistral4", vocab_size=len(tok))
    text.bos_token_id, text.eos_token_id, text.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    cfg = Mistral3Config(
        text_config=text.to_dict(),
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=16, head_dim=16),
        architectures=["Mistral3ForConditionalGeneration"],
        quantization_config={"quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK], "activation_scheme": "static"},
    )
    torch.manual_seed(0)
    state = Mistral3ForConditionalGeneration(cfg).to(torch.bfloat16).state_dict()
    stored, reference = {}, {}
    per_tensor_done = False
    for key, w in state.items():
        name = key.replace("model.language_model.", "model.", 1)
        if _is_quantized(key, w):
            if not per_tensor_done and key.endswith("o_proj.weight"):  # one per-tensor scale, as some FP8 releases
                s = w.float().abs().max() / FP8_MAX
                q, scale = (w.float() / s).to(FP8), s
                per_tensor_done = True
            else:
                q, scale = _quantize_blocks(w)
            base = key[: -len(".weight")] + ".weight_scale_inv" if key.endswith(".weight") else key + "_scale_inv"
            stored[key], stored[base] = q, scale
            act = key[: -len(".weight")] + ".activation_scale" if key.endswith(".weight") else key + "_activation_scale"
            stored[act] = torch.ones(() if key.endswith(".weight") else (w.shape[0],))
            reference[name] = _dequantize_by_hand(q, scale).to(torch.bfloat16)
        else:
            stored[key] = w.contiguous()
            if key.startswith("model.language_model.") or key.startswith("lm_head."):
                reference[name] = w
    out = tmp_path_factory.mktemp("mistral-small-4-release")
    keys = sorted(stored)
    from safetensors.torch import save_file

    weight_map = {}
    for i in range(3):  # three shards with an index, as released
        part = keys[i::3]
        fname = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: stored[k].contiguous() for k in part}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(out)
    tok.save_pretrained(out)
    num_vision = sum(1 for k in stored if "vision_tower" in k or "multi_modal_projector" in k)
    return out, reference, num_vision, text


def _reference_logits(reference: dict, text_config) -> torch.Tensor:
    from transformers import Mistral4ForCausalLM

    from fjordtune.model.weights import default_dtype

    with default_dtype(torch.bfloat16):
        model = Mistral4ForCausalLM(text_config)
    result = model.load_state_dict(reference, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(IDS)).logits.float()


def test_release_layout_is_classified_and_vision_is_counted(released, caplog):
    folder, reference, num_vision, _ = released
    with caplog.at_level(logging.INFO, logger="fjordtune.model.checkpoint"):
        ckpt = SafetensorsCheckpoint.open(folder)
    assert set(ckpt.sources) == set(reference)  # text names, nothing else
    assert ckpt.skipped["vision tower"] + ckpt.skipped["multimodal projector"] == num_vision
    assert any(k.startswith("activation scales") for k in ckpt.skipped)
    assert f"{num_vision + sum(v for k, v in ckpt.skipped.items() if k.startswith('activation'))}" in caplog.text
    assert "vision tower" in caplog.text
    assert ckpt.sources["model.layers.0.mlp.experts.gate_up_proj"].quantized


def test_one_process_load_equals_hand_dequantized_weights(released):
    from fjordtune.model.load import load_causal_lm

    folder, reference, _, text = released
    model = load_causal_lm(str(folder), dtype="bfloat16")
    state = model.state_dict()
    for name, want in reference.items():
        assert torch.equal(state[name], want), name
    with torch.no_grad():
        got = model(input_ids=torch.tensor(IDS)).logits.float()
    torch.testing.assert_close(got, _reference_logits(reference, text), rtol=1.6e-2, atol=1e-2)


def _rank(rank: int, world: int, port: int, folder: str, out: str) -> None:
    import torch.distributed as dist

    from fjordtune.config import load_job
    from fjordtune.train.core import TrainerCore

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, filename=str(Path(out) / f"rank{rank}.log"))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        job = load_job(JOB, ["model.dtype=bfloat16"])
        core = TrainerCore(job, model_dir=folder, device=torch.device("cpu"))
        with torch.no_grad():  # LoRA B is zero: the output is the base model's
            logits = core.model(input_ids=torch.tensor(IDS)).logits.float()
        if rank == 0:
            torch.save(logits, Path(out) / "logits.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_two_ranks_load_the_release_through_the_sharded_path(released):
    folder, reference, num_vision, text = released
    out = tempfile.mkdtemp(prefix="fjt-release-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(2, port, str(folder), out), nprocs=2, join=True)
    logits = torch.load(Path(out) / "logits.pt")
    torch.testing.assert_close(logits, _reference_logits(reference, text), rtol=1.6e-2, atol=1e-2)
    log = (Path(out) / "rank0.log").read_text()
    assert "vision tower" in log and "skipped" in log, log[-2000:]


# --- broken folders: one line, exit status 2 ------------------------------------------------------


def test_missing_shard_file_is_one_line(released, tmp_path):
    import shutil

    folder = tmp_path / "partial"
    shutil.copytree(released[0], folder)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(UserError, match=r"1 of 3 shard files .* are missing \(model-00002-of-00003") as err:
        SafetensorsCheckpoint.open(folder)
    assert len(err.value.lines) == 1


@pytest.mark.parametrize("files, hint", [
    (["consolidated.safetensors", "params.json"], "Mistral's native format"),
    (["pytorch_model.bin", "config.json"], "PyTorch pickles"),
    (["model.gguf"], "GGUF"),
])
def test_unrecognised_format_is_one_line(tmp_path, files, hint):
    for name in files:
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(UserError, match="checkpoint format not recognised") as err:
        SafetensorsCheckpoint.open(tmp_path)
    assert hint in err.value.lines[0] and len(err.value.lines) == 1


def test_fp8_without_scale_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"model.layers.0.self_attn.o_proj.weight": torch.zeros(4, 4).to(FP8)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="FP8 tensor.* without a scale"):
        SafetensorsCheckpoint.open(tmp_path)


def test_cli_reports_a_missing_shard_without_traceback(released, tmp_path):
    import shutil
    import subprocess
    import sys

    folder = tmp_path / "partial"
    shutil.copytree(released[0], folder)
    (folder / "model-00003-of-00003.safetensors").unlink()
    proc = subprocess.run([sys.executable, "-m", "fjordtune", "eval", str(JOB), "--output-dir", str(tmp_path / "o"),
                           "--set", f"model.path={folder}", "--set", "eval.limit=1", "--set", "eval.num_workers=1",
                           "--set", "eval.tasks=[nrk_quiz_qa_nob_p0]", "--set", f"storage.uri={tmp_path / 'runs'}"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "shard files listed in model.safetensors.index.json are missing" in proc.stderr


# --- dequantisation of row slices ---------------------------------------------------------------


@pytest.mark.parametrize("shape, grid", [((40, 24), (3, 2)), ((5, 40, 24), (5, 3, 2)), ((5, 40, 24), (5,)),
                                         ((40, 24), ()), ((40, 24), (40, 1))])
def test_any_row_slice_dequantizes_like_the_whole(shape, grid):
    torch.manual_seed(1)
    q = torch.randn(shape).to(FP8)
    scale = torch.rand(grid) + 0.5
    block = (BLOCK, BLOCK)
    whole = dequantize_rows(q, scale, full_shape=shape, start=0, block=block)
    for start, stop in [(0, 1), (3, 17), (15, 16), (shape[0] - 2, shape[0])]:
        part = dequantize_rows(q[start:stop], scale, full_shape=shape, start=start, block=block)
        assert torch.equal(part, whole[start:stop]), (start, stop)
    if len(grid) == 2 and grid[1] == 2:  # blocks: equal to the by-hand version
        assert torch.equal(whole, _dequantize_by_hand(q, scale))


def test_tied_embeddings_stay_tied_and_load(tmp_path):
    """A text-only checkpoint with tied embeddings (lm_head not stored): one parameter, loaded once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fjordtune.model.load import load_causal_lm

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    reference = LlamaForCausalLM(cfg)
    reference.save_pretrained(tmp_path)
    model = load_causal_lm(str(tmp_path), dtype="float32")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_merged_export_from_the_fp8_release(released, tmp_path, make_adapter):
    """Dequantized as read, the adapter merged, written as a bf16 text model: no vision tensors, no scales,
    and the weights the adapter leaves alone are the hand-dequantized ones exactly."""
    from safetensors import safe_open
    from transformers import Mistral4ForCausalLM

    from fjordtune.export.merged import export_merged
    from fjordtune.model.adapter import LoraUpdates

    folder, reference, _, text = released
    adapter = make_adapter(folder, tmp_path / "adapter")
    out = tmp_path / "merged"
    summary = export_merged(folder, adapter, out, dtype="bfloat16")
    assert summary.num_merged == 7 * text.num_hidden_layers
    model, info = Mistral4ForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "mistral4"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(reference)  # text weights only: no vision tower, scales or projector
    with LoraUpdates.open(adapter, text) as updates:
        for name in ("model.embed_tokens.weight", "model.layers.0.mlp.gate.weight",
                     "model.layers.1.mlp.experts.down_proj", "model.layers.0.self_attn.o_proj.weight"):
            with safe_open(str(out / index["weight_map"][name]), "pt") as f:
                got = f.get_tensor(name).float()
            update = updates.update(name)
            want = reference[name].float() + (update.rows(0, update.shape[0]) if update is not None else 0)
            tolerance = 0 if update is None else 1e-2 * want.abs().max()
            assert (got - want).abs().max() <= tolerance, name
