"""Build, stage and load base models, verifying every weight load.

The story's worst failure was silent: weights ignored at load time and a model that scored below
chance. `load_causal_lm` therefore refuses a checkpoint with missing, unexpected or mismatched keys.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fjordtune.errors import UserError

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
ASSETS = Path(__file__).resolve().parent.parent / "assets"


BUILTIN_PRESETS = {
    "tiny-mistral4": "Mistral4 at toy width (hidden 64, 2 layers, 4 experts): demos and tests",
    "mistral-small-4": "the real Mistral Small 4 dimensions (119B); config only, for preflight",
}
MAX_BUILTIN_WEIGHTS = 10**9  # presets larger than this are configs for preflight, never built


def builtin_config(preset: str, *, vocab_size: int | None = None) -> Any:
    """The transformers config of a builtin preset (random init for small ones, config-only for big)."""
    if preset == "mistral-small-4":
        from transformers import Mistral4Config

        # transformers' defaults are the released model's text config (vocab 131072, hidden 4096,
        # 36 layers, MLA, 128 experts top-4, one shared expert), checked in tests against FIELD-NOTES
        return Mistral4Config(architectures=["Mistral4ForCausalLM"])
    if preset == "tiny-mistral4":
        if vocab_size is None:
            raise ValueError("tiny-mistral4 takes its vocab size from the tokenizer")
        from transformers import Mistral4Config

        # Mistral Small 4's architecture (MLA attention, fused routed experts, one shared expert,
        # yarn RoPE, untied embeddings) at toy width.
        max_pos = 4096
        rope = dict(Mistral4Config().rope_parameters)  # the real model's yarn settings, scaled down
        rope.update(factor=4.0, original_max_position_embeddings=max_pos // 4, max_position_embeddings=max_pos)
        return Mistral4Config(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            qk_head_dim=16,
            head_dim=16,
            v_head_dim=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=0,
            max_position_embeddings=max_pos,
            rope_parameters=rope,
            tie_word_embeddings=False,
        )
    known = ", ".join(f"builtin:{k} ({v})" for k, v in BUILTIN_PRESETS.items())
    raise UserError(f"builtin:{preset}: unknown preset; known: {known}")


@contextlib.contextmanager
def quiet_peft_deprecations() -> Iterator[None]:
    """peft 0.21 still reads transformers' deprecated `is_gradient_checkpointing`: one FutureWarning
    per model per process, in every worker log. Silence exactly that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def causal_lm_class(config: Any) -> type:
    """The `*ForCausalLM` class for a config (AutoModelForCausalLM.from_config fails for Mistral4)."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None and name.endswith("ForCausalLM"):
            return cls
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    # Mistral4 is missing from the auto mapping: derive XForCausalLM from XConfig
    by_config = type(config).__name__.removesuffix("Config") + "ForCausalLM"
    for name in (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type), by_config):
        if name and hasattr(transformers, name):
            return getattr(transformers, name)
    return AutoModelForCausalLM  # type: ignore[return-value]


def load_tokenizer(location: str) -> Any:
    """A tokenizer from a local folder, `builtin:demo` (shipped with fjordtune) or a hub id."""
    from transformers import AutoTokenizer

    if location in ("builtin:demo", "builtin:tiny-mistral4"):
        location = str(ASSETS / "tokenizer")
    tok = AutoTokenizer.from_pretrained(location)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def save_builtin(preset: str, out_dir: str | Path, *, seed: int) -> Path:
    """Build a builtin random-init model with its tokenizer and save both as a normal model folder."""
    import torch

    out_dir = Path(out_dir)
    tok = load_tokenizer("builtin:demo")
    cfg = builtin_config(preset, vocab_size=len(tok))
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    cfg.architectures = [causal_lm_class(cfg).__name__]
    with torch.device("meta"):
        size = sum(p.numel() for p in causal_lm_class(cfg)(cfg).parameters())
    if size > MAX_BUILTIN_WEIGHTS:
        raise UserError(f"builtin:{preset} has {size / 1e9:.0f}B parameters: it is a config for preflight, "
                        "not a model to build; point model.path at real weights")
    if cfg.vocab_size != len(tok):
        raise UserError(f"builtin:{preset}: its vocabulary does not match the shipped demo tokenizer")
    torch.manual_seed(seed)
    model = causal_lm_class(cfg)(cfg)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def stage_base_model(path: str, *, run_uri: str, store: Any, seed: int = 0) -> str:
    """Return a location every worker can load: builtin presets are built once and committed to
    `<run_uri>/base-model`; other locations are returned unchanged."""
    if not path.startswith(BUILTIN_PREFIX):
        return path
    uri = f"{run_uri}/base-model"
    if store.is_committed(uri):
        log.info("reusing staged base model %s", uri)
        return uri
    with tempfile.TemporaryDirectory(prefix="fjordtune-base-") as tmp:
        save_builtin(path[len(BUILTIN_PREFIX) :], tmp, seed=seed)
        store.upload_dir(tmp, uri)
    log.info("staged %s at %s", path, uri)
    return uri


def check_model_folder(location: str, *, store: Any) -> None:
    """Refuse a model folder whose shards are missing or whose format is not read, before any worker or
    GPU starts: from its listing and index alone (s3:// or local; hub ids are left to the loader)."""
    from fjordtune.model.checkpoint import INDEX_FILE, check_folder, shard_files

    if location.startswith("s3://"):
        present = {name for name in store.list_files(location) if "/" not in name}
        check_folder(present, lambda: store.read_file(location, INDEX_FILE), where=location)
    elif Path(location).is_dir():
        shard_files(Path(location))


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
HUB_FILES = ("*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken")
"""What a hub download takes: config, index, tokenizer and chat template, the safetensors shards (not
Mistral's native `consolidated.safetensors` beside them)."""


def is_hub_id(location: str) -> bool:
    return not location.startswith(("s3://", BUILTIN_PREFIX, "/", ".", "~")) and not Path(location).exists() \
        and location.count("/") == 1


def local_model_dir(location: str, *, store: Any, cache_root: str | Path) -> str:
    """A local folder for `location`: committed s3:// folders and hub repositories are downloaded once per
    node into the cache (`storage.cache_dir`); local folders are used as they are."""
    if location.startswith("s3://"):
        return str(store.local_view(location, cache_root))
    if location.startswith(BUILTIN_PREFIX):
        raise UserError(f"{location}: builtin models must be staged first (stage_base_model)")
    if is_hub_id(location):
        return _hub_download(location, cache_root=cache_root, patterns=HUB_FILES)
    return location


def _hub_download(repo_id: str, *, cache_root: str | Path, patterns: tuple[str, ...]) -> str:
    """`huggingface_hub.snapshot_download` into `<cache>/hub`: its own per-file locks make the processes of
    a node share one download, as the s3:// cache does."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, cache_dir=str(Path(cache_root) / "hub"), allow_patterns=list(patterns),
                                 ignore_patterns=["consolidated*"])
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise UserError(f"model.path: {repo_id}: cannot download from the Hugging Face hub "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); set HF_TOKEN for a gated "
                        "repository, or mirror it to s3:// and point model.path there") from None


def local_tokenizer_dir(location: str, *, store: Any, dest: str | Path) -> str:
    """Where to load a model folder's tokenizer from without fetching its weights: an s3:// folder is
    downloaded to `dest` minus the weight files (238 GB for the 119B model), other locations as they are."""
    if location.startswith("s3://"):
        return str(store.download_dir(location, dest, exclude=WEIGHT_FILES))
    if is_hub_id(location):
        return _hub_download(location, cache_root=dest, patterns=tuple(p for p in HUB_FILES if p != "*.safetensors"))
    return location


def load_causal_lm(location: str, *, dtype: str = "bfloat16", device: str = "cpu",
                   device_map: str | None = None) -> Any:
    """Load a whole causal LM from a local model folder through the verified streaming loader
    (`model/weights.py`): text-only or multimodal (Mistral3) layouts, bf16/fp32 or FP8 weights, every
    checkpoint tensor matched to a parameter and vice versa. Straight onto `device`, never whole in host
    memory first; with `device_map="auto"` the layers are spread over every visible GPU (accelerate)."""
    import torch

    from fjordtune.model.weights import load_model

    return load_model(location, dtype=getattr(torch, dtype), device=device, device_map=device_map)
