"""A GGUF file of the tuned model (bf16, q8_0 or Q4_K_M, as the story shipped), made by llama.cpp's own tools.

The pipeline, one step at a time so disk holds at most two copies and memory one tensor or block:

1. `export_merged`: base + adapter into a plain Hugging Face folder (streaming, `export/merged.py`).
2. llama.cpp's `convert_hf_to_gguf.py` (lazy, tensor by tensor) into a bf16 / q8_0 GGUF, in a separate
   process (`export/_convert.py`). The converter is not in llama-cpp-python's wheel; it is taken from
   the sdist of the same version, from the package index pip uses (`pip download`), once per machine
   into the node cache, together with the `gguf` package copy it was written against (PyPI's gguf
   0.19.0 is older than the converter of llama-cpp-python 0.3.36 and fails on it; docs/export.md).
3. For Q4_K_M: llama.cpp's quantizer (`llama_model_quantize`, compiled in llama-cpp-python) from the bf16 GGUF.
4. Checks before the file is published: llama.cpp reads it back, and its tokenizer gives the same token
   ids as the Hugging Face tokenizer on sample texts (a GGUF with the wrong pre-tokenizer loads fine and
   answers wrongly: the silent failure this refuses).

Support is decided by llama.cpp itself: an architecture its converter does not know, or a tokenizer it
cannot represent, is refused in one line with exit 2, and nothing is written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fjordtune.errors import UserError

log = logging.getLogger(__name__)

QUANTS = {"bf16": "bf16", "q8_0": "q8_0", "q4_k_m": "bf16"}
"""--quant -> the converter's --outtype (Q4_K_M is quantized from the bf16 file by llama.cpp's quantizer)."""
CONVERTER_ENV = "FJORDTUNE_LLAMA_CPP_CONVERTER"
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/")


@dataclass(frozen=True)
class GgufSummary:
    path: Path
    quant: str
    bytes: int
    seconds: float

    @property
    def out_dir(self) -> Path:
        """The folder written (what an s3:// destination receives), as `ExportSummary.out_dir`."""
        return self.path.parent

    def line(self) -> str:
        return f"export: {self.path.name} ({self.quant}, {self.bytes / 1e9:.2f} GB) in {self.seconds:.1f} s -> {self.path}"


def llama_cpp_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        raise UserError("--format gguf needs llama.cpp for Python: pip install 'fjordtune[gguf]' (builds llama.cpp "
                        "from source: about 5 minutes on 2 cores, a C++ compiler and cmake needed)") from None


def converter_dir(cache: str | Path) -> Path:
    """llama.cpp's converter matching the installed llama-cpp-python: $FJORDTUNE_LLAMA_CPP_CONVERTER (a llama.cpp
    checkout), else `<cache>/llama.cpp-converter-<version>`, fetched from the sdist on first use."""
    if os.environ.get(CONVERTER_ENV):
        found = Path(os.environ[CONVERTER_ENV])
        if not (found / "convert_hf_to_gguf.py").is_file():
            raise UserError(f"{CONVERTER_ENV}={found}: no convert_hf_to_gguf.py there")
        return found
    version = llama_cpp_version()
    dest = Path(cache) / f"llama.cpp-converter-{version}"
    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest
    Path(cache).mkdir(parents=True, exist_ok=True)
    log.info("export: fetching llama.cpp's converter from the llama-cpp-python %s sdist (once per machine)", version)
    with tempfile.TemporaryDirectory(prefix="llama-sdist-", dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-d", tmp, f"llama-cpp-python=={version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not sdists:
            raise UserError(f"cannot fetch the llama-cpp-python {version} sdist for its converter "
                            f"({(done.stderr.strip().splitlines() or ['no sdist'])[-1][:300]}); or point "
                            f"{CONVERTER_ENV} at a llama.cpp checkout of the same version")
        staging = Path(tmp) / "converter"
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                rel = member.name.split("/vendor/llama.cpp/", 1)
                if len(rel) == 2 and rel[1].startswith(CONVERTER_FILES) and (member.isfile() or member.isdir()):
                    member.name = rel[1]
                    tar.extract(member, staging, filter="data")
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise UserError(f"the llama-cpp-python {version} sdist has no vendor/llama.cpp/convert_hf_to_gguf.py")
        try:
            staging.rename(dest)  # whole or not at all; another process may have won the race
        except OSError:
            if not (dest / "convert_hf_to_gguf.py").is_file():
                raise
    return dest


def pre_tokenizer_fallback(model_dir: Path) -> str | None:
    """The llama.cpp pre-tokenizer for a tokenizer whose hash llama.cpp does not list, when tokenizer.json
    says which it is: GPT-2's byte-level regex alone is llama.cpp's `gpt-2`. None: let the converter decide
    (it refuses what it does not know)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    spec = json.loads(path.read_text(encoding="utf-8"))
    pre, normalizer = spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    if (spec.get("model", {}).get("type") == "BPE" and normalizer is None and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)):
        return "gpt-2"
    return None


def architecture_of(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    return (config.get("architectures") or ["?"])[0]


def convert(converter: Path, model_dir: Path, out_file: Path, *, outtype: str) -> None:
    """Run the converter (a child process; its progress goes to stderr). Exit 2 when it refuses the model."""
    env = dict(os.environ)
    fallback = pre_tokenizer_fallback(model_dir)
    if fallback:
        env["FJORDTUNE_GGUF_PRE"] = fallback
    cmd = [sys.executable, "-m", "fjordtune.export._convert", str(converter), str(model_dir), "--outfile", str(out_file),
           "--outtype", outtype, "--model-name", model_dir.name]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in proc.stdout or ():  # the converter's progress, passed on as it comes
        sys.stderr.write(line)
        if line.strip():
            tail = [*tail[-2:], line.rstrip()]
    if proc.wait() != 0:
        out_file.unlink(missing_ok=True)
        arch = architecture_of(model_dir)
        if any("not supported" in line or "NotImplementedError" in line for line in tail):
            raise UserError(f"--format gguf: llama.cpp's converter (llama-cpp-python {llama_cpp_version()}) does not "
                            f"support this model ({arch}): {tail[-1][:300]}")
        raise UserError(f"--format gguf: llama.cpp's converter failed on {arch}: {tail[-1][:300] if tail else '?'}")


def quantize(src: Path, dst: Path, *, ftype: int, threads: int | None = None) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        dst.unlink(missing_ok=True)
        raise UserError(f"llama.cpp's quantizer failed on {src.name} (status {rc})")


SAMPLE_TEXTS = (
    "Hva er hovedstaden i Norge?", "Kva heiter den lengste elva i Noreg?", "Æ, ø og å: blåbærsyltetøy på skiva.",
    "  two spaces, a\ttab and\nnew lines\n\n", "I've been told he's there; 'RE you sure? 3.14 + 42 = 45.14",
    "🚀 emoji og 中文 og русский текст", "[INST] hei [/INST] svar</s>",
)


def check_tokenizer(gguf_file: Path, tokenizer_dir: Path, *, texts: tuple[str, ...] | list[str] = SAMPLE_TEXTS) -> None:
    """llama.cpp reads the file's header and vocabulary, and tokenizes `texts` to the Hugging Face ids."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    llm = Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)
    try:
        for text in texts:
            ours = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            theirs = hf(text, add_special_tokens=False)["input_ids"]
            if ours != theirs:
                raise UserError(f"--format gguf: llama.cpp tokenizes {text!r} differently from the model's tokenizer "
                                f"({ours[:12]} vs {theirs[:12]}): the GGUF would load and answer wrongly, so it is "
                                "not written")
    finally:
        llm.close()


def export_gguf(model_dir: str | Path, adapter_dir: str | Path | None, out_dir: str | Path, *, quant: str = "q4_k_m",
                dtype: str = "bfloat16", cache: str | Path, name: str = "model") -> GgufSummary:
    """Write `out_dir/<name>-<QUANT>.gguf` (a new folder, renamed into place when the file passed its checks)."""
    import llama_cpp

    from fjordtune.export.merged import export_merged

    if quant not in QUANTS:
        raise UserError(f"--quant {quant}: use one of {', '.join(QUANTS)}")
    t0 = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: exists and is not empty; export writes a new folder")
    converter = converter_dir(cache)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    final = partial / f"{name}-{quant.upper()}.gguf"
    try:
        with tempfile.TemporaryDirectory(prefix="gguf-", dir=partial.parent) as tmp:
            merged = export_merged(model_dir, adapter_dir, Path(tmp) / name, dtype=dtype).out_dir
            log.info("export: merged folder written; converting with llama.cpp (%s)", QUANTS[quant])
            first = final if quant != "q4_k_m" else Path(tmp) / f"{name}-BF16.gguf"
            convert(converter, merged, first, outtype=QUANTS[quant])
            check_tokenizer(first, merged)
            if quant == "q4_k_m":
                shutil.rmtree(merged)  # its space goes to the quantized file
                log.info("export: quantizing to Q4_K_M with llama.cpp")
                quantize(first, final, ftype=llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)
                check_tokenizer(final, model_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out_dir.exists():
        out_dir.rmdir()
    partial.rename(out_dir)
    path = out_dir / final.name
    return GgufSummary(path, quant, path.stat().st_size, time.perf_counter() - t0)
