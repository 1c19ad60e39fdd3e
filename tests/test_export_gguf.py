"""`fjordtune export --format gguf`: llama.cpp's own converter and quantizer (llama-cpp-python, compiled at install),
and llama.cpp itself (through its Python binding) reading the result back.

The model is a small Mistral4 (MLA attention, 4 stacked experts, a shared expert) wide enough for Q4_K blocks
(256 columns), trained for 200 steps on the bundled Norwegian rows so that its next-token choices are
decided rather than near-ties: a random-init model's top-2 logit margins (median 0.08, min 0.001) are below
q8_0's rounding, and no comparison of quantized next tokens on it means anything (measured in docs/export.md).
A LoRA adapter on attention and experts, trained on the held-out rows (where the prompts come from), is merged
on top: a random adapter small enough to keep those margins changes no next token, and then a GGUF that lost
the merge would pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import llama_cpp  # part of the test install (fjordtune[test]): a missing one fails here, it does not skip
import numpy as np
import pytest
import torch
from conftest import LORA_ATTENTION, LORA_EXPERTS

from fjordtune.cli import main

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
WIDE = dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=256, q_lora_rank=256, kv_lora_rank=256,
            v_head_dim=64)


def _prompts() -> list[str]:
    """The 20 held-out rows, each cut at a seeded random word past its middle: 'continue this text' prompts."""
    rows = [json.loads(line) for line in (REPO / "src/fjordtune/samples/sft/demo-heldout.jsonl").open()]
    rng = np.random.default_rng(0)
    prompts = []
    for row in rows[:20]:
        words = " ".join(m["content"] for m in row["messages"]).split(" ")
        prompts.append(" ".join(words[: int(rng.integers(len(words) // 2, len(words)))]))
    return prompts


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import Mistral4ForCausalLM

    from fjordtune.model.load import builtin_config, load_tokenizer, quiet_peft_deprecations

    tok = load_tokenizer("builtin:demo")
    cfg = builtin_config("tiny-mistral4", vocab_size=len(tok))
    for key, value in WIDE.items():
        setattr(cfg, key, value)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    cfg.architectures = ["Mistral4ForCausalLM"]
    torch.manual_seed(0)
    model = Mistral4ForCausalLM(cfg)
    _train(model, tok, "demo.jsonl", steps=200, lr=3e-3)
    tmp = tmp_path_factory.mktemp("gguf")
    model.save_pretrained(tmp / "base")
    tok.save_pretrained(tmp / "base")
    # the adapter learns the held-out rows (the prompts below), so the merge visibly changes next tokens
    with quiet_peft_deprecations():
        tuned = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_ATTENTION,
                                                 target_parameters=LORA_EXPERTS))
    _train(tuned, tok, "demo-heldout.jsonl", steps=100, lr=5e-3)
    tuned.save_pretrained(tmp / "adapter")
    adapter = tmp / "adapter"
    return {"base": tmp / "base", "adapter": adapter, "tmp": tmp}


def _train(model, tok, file: str, *, steps: int, lr: float) -> None:
    rows = [json.loads(line) for line in (REPO / "src/fjordtune/samples/sft" / file).open()]
    ids = torch.tensor(tok("\n".join(" ".join(m["content"] for m in r["messages"]) for r in rows),
                           add_special_tokens=False)["input_ids"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 129, (8,), generator=gen)
        batch = torch.stack([ids[i:i + 128] for i in starts])
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()


def _export(trained, fmt: str, out: Path, *extra: str) -> int:
    return main(["export", str(REPO / "jobs/demo.yaml"), "--set", f"model.path={trained['base']}", "--adapter",
                 str(trained["adapter"]), "--set", f"storage.cache_dir={trained['tmp'] / 'cache'}", "--format", fmt,
                 "--out", str(out), *extra])


def _next_tokens_hf(folder: Path, prompts: list[str]) -> tuple[list[int], list[float]]:
    from transformers import AutoTokenizer, Mistral4ForCausalLM

    tok = AutoTokenizer.from_pretrained(folder)
    model = Mistral4ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens, margins = [], []
    for text in prompts:
        with torch.no_grad():
            logits = model(torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])).logits[0, -1]
        top = torch.topk(logits, 2).values
        tokens.append(int(logits.argmax()))
        margins.append(float(top[0] - top[1]))
    return tokens, margins


def _next_tokens_llama_cpp(gguf: Path, prompts: list[str]) -> list[int]:
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    try:
        out = []
        for text in prompts:
            ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            llm.reset()
            llm.eval(ids)
            out.append(int(np.argmax(llm.scores[len(ids) - 1])))
        return out
    finally:
        llm.close()


def test_gguf_next_tokens_match_transformers_on_the_merged_model(trained, capsys):
    prompts = _prompts()
    assert _export(trained, "merged", trained["tmp"] / "merged", "--dtype", "bfloat16") == 0
    expected, margins = _next_tokens_hf(trained["tmp"] / "merged", prompts)
    base_tokens, _ = _next_tokens_hf(trained["base"], prompts)
    changed = sum(a != b for a, b in zip(expected, base_tokens))
    report = [f"the adapter changes {changed}/20 next tokens"]
    assert changed >= 3, "the adapter should change next tokens, or the test would not see a lost merge"
    report.append(f"top-2 logit margin on the merged model: median {np.median(margins):.3f}, min {min(margins):.3f}")
    agreement = {}
    for quant in ("bf16", "q8_0", "q4_k_m"):
        out = trained["tmp"] / f"gguf-{quant}"
        assert _export(trained, "gguf", out, "--quant", quant) == 0
        (gguf,) = out.glob("*.gguf")
        assert gguf.name == f"demo-{quant.upper()}.gguf"
        got = _next_tokens_llama_cpp(gguf, prompts)
        agreement[quant] = sum(a == b for a, b in zip(got, expected))
        report.append(f"{quant}: {agreement[quant]}/20 greedy next tokens equal, {gguf.stat().st_size / 1e6:.2f} MB")
    with capsys.disabled():
        print("\n" + "\n".join(report))
    assert agreement["bf16"] == 20 and agreement["q8_0"] == 20, agreement
    assert agreement["q4_k_m"] >= 16, agreement
    sizes = {q: next((trained["tmp"] / f"gguf-{q}").glob("*.gguf")).stat().st_size for q in agreement}
    assert sizes["q4_k_m"] < sizes["q8_0"] < sizes["bf16"]
    assert "-> " + str(trained["tmp"] / "gguf-q4_k_m") in capsys.readouterr().out


def test_a_tokenizer_llama_cpp_cannot_represent_is_refused_with_exit_2_and_nothing_written(trained, capsys):
    """A BPE tokenizer with a normalizer and a Metaspace pre-tokenizer (SentencePiece style, kept as BPE): its
    hash is not in llama.cpp's list and it is not GPT-2's byte-level scheme, so the converter refuses it."""
    import shutil

    base = trained["tmp"] / "odd-tokenizer"
    shutil.copytree(trained["base"], base)
    spec = json.loads((base / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (base / "tokenizer.json").write_text(json.dumps(spec))
    out = trained["tmp"] / "refused"
    status = main(["export", str(REPO / "jobs/demo.yaml"), "--set", f"model.path={base}", "--adapter",
                   str(trained["adapter"]), "--set", f"storage.cache_dir={trained['tmp'] / 'cache'}", "--format",
                   "gguf", "--quant", "q8_0", "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "llama.cpp" in errors[0] and "Mistral4ForCausalLM" in errors[0], err
    assert not out.exists() and not out.with_name("refused.partial").exists()
