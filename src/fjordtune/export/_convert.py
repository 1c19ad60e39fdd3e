"""Run llama.cpp's own `convert_hf_to_gguf.py` (from the llama-cpp-python sdist) in this process, with two
additions and nothing else changed:

- `Mistral4ForCausalLM` (a text-only Mistral Small 4 folder, what `fjordtune export --format merged`
  writes) goes to the converter's Mistral 3/4 class, which llama.cpp registers only under the multimodal
  `Mistral3ForConditionalGeneration`. That class already picks its Mistral 4 (MLA + stacked experts)
  writer from `model_type: mistral4`; only the name lookup is added.
- A BPE tokenizer whose pre-tokenizer hash llama.cpp does not list gets the pre-tokenizer name that
  `FJORDTUNE_GGUF_PRE` gives (chosen by `export/gguf.py` from tokenizer.json, and checked after the
  conversion by tokenizing with llama.cpp). Without it the converter's own refusal stands.

Usage: python -m fjordtune.export._convert CONVERTER_DIR MODEL_DIR --outfile F --outtype T
(the converter's own arguments after CONVERTER_DIR). A separate process: the converter puts its own copy
of the `gguf` package first on sys.path, which must not shadow the installed one elsewhere.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    converter_dir, argv = sys.argv[1], sys.argv[2:]
    # the converter's own gguf copy first (as the converter itself does), then the converter
    sys.path[:0] = [os.path.join(converter_dir, "gguf-py"), converter_dir]
    import conversion
    import convert_hf_to_gguf
    from conversion.base import ModelBase, TextModel

    conversion.TEXT_MODEL_MAP.setdefault("Mistral4ForCausalLM", "mistral3")
    import conversion.mistral3

    if "Mistral4ForCausalLM" not in ModelBase._model_classes[conversion.ModelType.TEXT]:
        ModelBase.register("Mistral4ForCausalLM")(conversion.mistral3.Mistral3Model)

    fallback = os.environ.get("FJORDTUNE_GGUF_PRE")
    if fallback:
        recognised = TextModel.get_vocab_base_pre

        def vocab_base_pre(self, tokenizer):  # noqa: ANN001, ANN202  the converter's signature
            try:
                return recognised(self, tokenizer)
            except NotImplementedError:
                print(f"fjordtune: pre-tokenizer not in llama.cpp's list; using {fallback!r} (from tokenizer.json)",
                      file=sys.stderr)
                return fallback

        TextModel.get_vocab_base_pre = vocab_base_pre
    sys.argv = ["convert_hf_to_gguf.py", *argv]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
