"""Build fjordtune's small demo tokenizer (`src/fjordtune/assets/tokenizer/`) from the bundled samples.

The tokenizer is a byte-level BPE (so any text, including æ/ø/å and emoji, encodes without
`<unk>`) of about 2000 tokens, trained on the instruction sample (`samples/sft/demo.jsonl`) and the
text of the NorEval-format samples (`samples/noreval/**.jsonl`). It carries the special tokens
`<unk>`, `<s>` (bos), `</s>` (eos), `<pad>`, `[INST]`, `[/INST]` and a Mistral-style chat template:

    <s>[INST] {user} [/INST] {assistant}</s><s>[INST] {user} [/INST] ...

It exists so tiny models built in code can be trained, evaluated and tested without downloads; it is
not the tokenizer of Mistral Small 4. The output is byte-identical on every run (single-threaded
training over a sorted corpus), so `--check` can tell whether the shipped files are up to date.

    python scripts/build_tokenizer.py                 # rebuild the shipped files
    python scripts/build_tokenizer.py --check         # exit 1 if they differ from a fresh build
    python scripts/build_tokenizer.py --out /tmp/tok  # build somewhere else
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Single-threaded training keeps merges (and so the files) identical from run to run.
os.environ["TOKENIZERS_PARALLELISM"] = "false"

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "fjordtune"
DEFAULT_OUT = PACKAGE / "assets" / "tokenizer"
SFT_SAMPLE = PACKAGE / "samples" / "sft" / "demo.jsonl"
NOREVAL_SAMPLES = PACKAGE / "samples" / "noreval"

UNK, BOS, EOS, PAD, INST, END_INST = "<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, INST, END_INST)  # ids 0..5 in this order
DEFAULT_VOCAB_SIZE = 2000
MODEL_MAX_LENGTH = 32768

# Mistral style: every user/assistant pair is `<s>[INST] {user} [/INST] {assistant}</s>`; a system
# message is prepended to the first user message. A conversation ending on a user turn ends right
# after `[/INST]`, which is also what `add_generation_prompt=True` asks for. The space before the
# assistant reply belongs to the reply, so rendering a prefix gives a token prefix of the whole.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}\n"
    "    {%- set system_message = messages[0]['content'] -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set system_message = '' -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- set expected_role = 'user' if loop.index0 % 2 == 0 else 'assistant' -%}\n"
    "    {%- if message['role'] != expected_role -%}\n"
    "        {{- raise_exception('Conversation roles must be user/assistant/user/assistant/... "
    "after an optional first system message; message ' ~ loop.index0 ~ ' has role ' ~ message['role']) -}}\n"
    "    {%- endif -%}\n"
    "    {%- if message['role'] == 'user' -%}\n"
    "        {%- if loop.first and system_message -%}\n"
    "            {{- bos_token ~ '[INST] ' ~ system_message ~ '\\n\\n' ~ message['content'] ~ ' [/INST]' -}}\n"
    "        {%- else -%}\n"
    "            {{- bos_token ~ '[INST] ' ~ message['content'] ~ ' [/INST]' -}}\n"
    "        {%- endif -%}\n"
    "    {%- else -%}\n"
    "        {{- ' ' ~ message['content'] ~ eos_token -}}\n"
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt and loop_messages and loop_messages[-1]['role'] == 'assistant' -%}\n"
    "    {{- raise_exception('add_generation_prompt needs a conversation that ends with a user message') -}}\n"
    "{%- endif -%}\n"
)

# Fields of the NorEval rows that hold natural-language text (ids, labels and flags are skipped).
_TEXT_FIELDS = ("question", "question_stem", "fact", "quiz")


def iter_corpus() -> Iterator[str]:
    """Training texts in a fixed order: the SFT sample, then every NorEval sample file (sorted)."""
    for line in SFT_SAMPLE.read_text(encoding="utf-8").splitlines():
        if line.strip():
            for message in json.loads(line)["messages"]:
                yield message["content"]
    for path in sorted(NOREVAL_SAMPLES.rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            for field in _TEXT_FIELDS:
                if row.get(field):
                    yield row[field]
            if "choices" in row:
                yield from row["choices"]["text"]
            if "mc1_targets" in row:
                yield from row["mc1_targets"]["choices"]


def build(out_dir: Path, *, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Train the tokenizer and save it as a `transformers` tokenizer folder at `out_dir`."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(iter_corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    # Like Mistral's tokenizer, plain `encode` starts with <s>; the chat template writes its own.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[INST, END_INST],
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out_dir))
    return out_dir


def differences(expected_dir: Path, actual_dir: Path) -> list[str]:
    """Names of files that differ (or exist on one side only) between two tokenizer folders."""
    names = sorted({p.name for p in expected_dir.iterdir()} | {p.name for p in actual_dir.iterdir()})
    out = []
    for name in names:
        a, b = expected_dir / name, actual_dir / name
        if not (a.is_file() and b.is_file() and filecmp.cmp(a, b, shallow=False)):
            out.append(name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="build_tokenizer.py",
        description=__doc__.split("\n\n")[0],
        epilog="Rerunning reproduces byte-identical files.",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument(
        "--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="target vocabulary size, special tokens included"
    )
    parser.add_argument(
        "--check", action="store_true", help="build into a temporary folder and exit 1 if --out differs from it"
    )
    args = parser.parse_args(argv)

    if args.check:
        with tempfile.TemporaryDirectory(prefix="fjordtune-tok-") as tmp:
            fresh = build(Path(tmp), vocab_size=args.vocab_size)
            if not args.out.is_dir():
                print(f"{args.out}: no such folder; run without --check to build it", file=sys.stderr)
                return 1
            diff = differences(fresh, args.out)
            if diff:
                print(
                    f"{args.out} is out of date ({', '.join(diff)}); rerun scripts/build_tokenizer.py", file=sys.stderr
                )
                return 1
        print(f"{args.out} is up to date")
        return 0

    out = build(args.out, vocab_size=args.vocab_size)
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    print(f"wrote {out}: " + ", ".join(f"{name} ({size} B)" for name, size in sizes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
