"""Tensor-parallel scoring (`eval/tp.py`) with two real gloo processes on a tiny Mistral4: the same scores as
one process (three scoring paths), half the experts' bytes per rank, each shard exactly the slice the
loader read, a LoRA adapter (experts included) merged shard by shard, and a failing follower that fails
rank 0 in seconds instead of hanging. Plus the refusals, without processes."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from scoring_helpers import mc_requests, random_lora_adapter

pytestmark = pytest.mark.integration

WORLD = 2
SPAWN_DEADLINE_S = 240


def _requests(seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Each context with 2-4 continuations of 1-6 tokens, every other choice a single token (about 36 pairs)."""
    return mc_requests(seed, num=12, max_context=40, choices=(2, 5), max_continuation=7, one_token_every_other=True)


def _worker(rank: int, world: int, port: int, model_dir: str, adapter_dir: str, out: str) -> None:
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor

    from fjordtune.errors import InfraError
    from fjordtune.eval import tp
    from fjordtune.eval.tp import TPScorer, init_group, load_tp_model, local_param_bytes, shard_indices

    torch.set_num_threads(1)
    init_group(rank, world, master_addr="127.0.0.1", master_port=port, timeout_s=120)
    ctxs, conts = _requests(0)
    res: dict = {}

    model = load_tp_model(model_dir, dtype="float32", device="cpu")
    res["expert_bytes"] = local_param_bytes(model, contains=".mlp.experts.")
    full = load_file(str(Path(model_dir) / "model.safetensors"))
    slices = {}
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            [(dim, split)] = tp._shard_dims(p)
            idx = shard_indices(p.shape[dim], rank=rank, world=world, split_factor=split)
            slices[name] = torch.equal(p.to_local(), full[name].index_select(dim, idx))
    res["slices"] = slices
    for name, shared in (("packed", True), ("full", False), ("kv_cache", True)):
        scorer = TPScorer(model)
        if name == "kv_cache":  # the context pass + KV-cache path (flash-attention models take it)
            scorer.scorer.packed = False
        if rank == 0:
            res[name] = scorer.score(ctxs, conts, shared_context=shared)
            scorer.close()
        else:
            res[f"served_{name}"] = scorer.serve()
    del model, scorer

    model = load_tp_model(model_dir, dtype="float32", device="cpu", adapter_dir=adapter_dir)
    res["adapter_expert_bytes"] = local_param_bytes(model, contains=".mlp.experts.")
    scorer = TPScorer(model)
    if rank == 0:
        res["adapter"] = scorer.score(ctxs, conts)
        start = time.monotonic()
        try:
            scorer.score(ctxs[:3], conts[:3])  # the follower fails on this one
        except InfraError as e:
            res["failed_after_s"] = time.monotonic() - start
            res["error"] = str(e)
    else:
        real, calls = scorer.scorer.score, []

        def fail_second(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("out of memory on rank 1 (simulated)")
            return real(*args, **kwargs)

        scorer.scorer.score = fail_second
        try:
            scorer.serve()
        except Exception as e:  # noqa: BLE001 - what the follower saw is the result
            res["follower_error"] = f"{type(e).__name__}: {e}"
    torch.save(res, Path(out) / f"rank{rank}.pt")


def _spawn(*args: str) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_worker, args=(WORLD, port, *args), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"tensor-parallel workers still running after {SPAWN_DEADLINE_S} s: a hang")
    return [torch.load(Path(args[-1]) / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter with non-zero B on MLA projections and on both fused expert parameters."""
    out = tmp_path_factory.mktemp("adapter")
    random_lora_adapter(str(tiny_model_dir), str(out))
    return out


CPU_TP = pytest.mark.skipif(torch.cuda.is_available(), reason="transformers puts TP shards on the machine's "
                            "accelerator: on a GPU machine tests/test_gpu.py checks TP over NCCL")


@pytest.fixture(scope="module")
def tp_run(tiny_model_dir, adapter_dir, tmp_path_factory) -> list[dict]:
    return _spawn(str(tiny_model_dir), str(adapter_dir), str(tmp_path_factory.mktemp("tp-run")))


def _max_diff(a: list, b: list) -> float:
    return max(abs(x[0] - y[0]) for x, y in zip(a, b, strict=True))


@CPU_TP
def test_tp_scores_equal_one_process_on_every_path(tiny_model_dir, tp_run):
    from fjordtune.eval.scorer import Scorer

    ctxs, conts = _requests(0)
    assert len(conts) >= 24 and sum(len(c) == 1 for c in conts) >= 8
    one = Scorer(str(tiny_model_dir), dtype="float32")
    single = one.score(ctxs, conts)
    res = tp_run[0]
    for name in ("packed", "full", "kv_cache"):
        assert _max_diff(res[name], single) < 1e-4, (name, _max_diff(res[name], single))
        assert [r[1] for r in res[name]] == [r[1] for r in single], name
    assert [tp_run[1][f"served_{n}"] for n in ("packed", "full", "kv_cache")] == [1, 1, 1]


@CPU_TP
def test_each_rank_holds_half_of_the_experts_exactly_as_loaded(tiny_model_dir, tp_run):
    from fjordtune.eval.tp import local_param_bytes
    from fjordtune.model.load import load_causal_lm

    whole = local_param_bytes(load_causal_lm(str(tiny_model_dir), dtype="float32"), contains=".mlp.experts.")
    for res in tp_run:
        for key in ("expert_bytes", "adapter_expert_bytes"):
            assert 0.45 <= res[key] / whole <= 0.55, (key, res[key], whole)
        # every sharded weight, our slicing of the full tensor equals what transformers' loader gave the rank
        assert res["slices"] and all(res["slices"].values()), res["slices"]
        assert any("experts.gate_up_proj" in n for n in res["slices"])  # the fused, strided case is among them


@CPU_TP
def test_adapter_merged_into_the_shards_scores_like_one_process(tiny_model_dir, adapter_dir, tp_run):
    from fjordtune.eval.scorer import Scorer

    ctxs, conts = _requests(0)
    merged = Scorer(str(tiny_model_dir), adapter_dir=str(adapter_dir), dtype="float32").score(ctxs, conts)
    unmerged = Scorer(str(tiny_model_dir), adapter_dir=str(adapter_dir), dtype="float32",
                      merge_adapter=False).score(ctxs, conts)
    got = tp_run[0]["adapter"]
    assert _max_diff(got, merged) < 1e-4 and _max_diff(got, unmerged) < 1e-4
    assert [r[1] for r in got] == [r[1] for r in merged]
    assert _max_diff(got, tp_run[0]["packed"]) > 1e-2  # the adapter changed the scores: a real comparison


@CPU_TP
def test_a_failing_follower_fails_rank0_in_seconds(tp_run):
    rank0, rank1 = tp_run
    assert "simulated" in rank1["follower_error"], rank1["follower_error"]
    assert rank0["failed_after_s"] < 30, rank0  # the group's timeout is 120 s: torn down, not timed out
    assert "another rank failed or died" in rank0["error"]


def test_an_architecture_without_a_tp_plan_is_refused(tmp_path):
    from transformers import GPT2Config

    from fjordtune.errors import UserError
    from fjordtune.eval.tp import load_tp_model, tp_supported

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="no tensor-parallel plan for GPT2Config"):
        load_tp_model(str(tmp_path), dtype="float32", device="cpu")
    assert not tp_supported(GPT2Config())


def test_wrong_device_or_dtype_is_refused_before_loading(tiny_model_dir):
    from transformers import AutoConfig

    from fjordtune.errors import UserError
    from fjordtune.eval.tp import load_tp_model, tp_supported

    assert tp_supported(AutoConfig.from_pretrained(tiny_model_dir))
    with pytest.raises(UserError, match="not a torch dtype"):
        load_tp_model(str(tiny_model_dir), dtype="fp32", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="pass device='cpu'"):
            load_tp_model(str(tiny_model_dir), dtype="float32", device="cuda")


def test_uneven_splits_and_split_heads_are_refused():
    """transformers accepts sizes that do not divide (the last rank gets less); we refuse them, and a TP'd
    attention whose heads do not divide. On a fake 2-rank group in this process: no weights, no workers."""
    import types

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from fjordtune.errors import UserError
    from fjordtune.eval.tp import _check_divisible

    def sharded(*shape: int, dim: int) -> torch.nn.Parameter:
        meta = torch.empty(*shape, device="meta")
        return torch.nn.Parameter(distribute_tensor(meta, mesh, [Shard(dim)], src_data_rank=None))

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        experts = torch.nn.Module()
        experts.down_proj = sharded(4, 64, 33, dim=2)  # moe_intermediate_size 33
        experts.config = types.SimpleNamespace()
        with pytest.raises(UserError, match=r"down_proj: dim 2 of \(4, 64, 33\) does not split into 2"):
            _check_divisible(experts, 2)
        experts.down_proj = sharded(4, 64, 32, dim=2)
        _check_divisible(experts, 2)
        layer = torch.nn.Module()
        layer.self_attn = torch.nn.Module()
        layer.self_attn.q_proj = sharded(48, 16, dim=0)  # 3 heads of 16: rows divide, heads do not
        model = torch.nn.Module()
        model.layer = layer
        model.config = types.SimpleNamespace(num_attention_heads=3, num_key_value_heads=3)
        with pytest.raises(UserError, match="num_attention_heads=3 does not divide by 2"):
            _check_divisible(model, 2)
    finally:
        dist.destroy_process_group()


def test_shard_indices_follow_the_loaders_layout():
    from fjordtune.eval.tp import shard_indices

    assert shard_indices(8, rank=1, world=2).tolist() == [4, 5, 6, 7]
    # fused gate_up [gate 0..3 | up 4..7] over 2 ranks: each rank its half of gate and its half of up
    assert shard_indices(8, rank=0, world=2, split_factor=2).tolist() == [0, 1, 4, 5]
    assert shard_indices(8, rank=1, world=2, split_factor=2).tolist() == [2, 3, 6, 7]


def test_scorer_for_model_sets_what_scorer_init_sets(tiny_model_dir):
    """The TP scorer is built around a loaded model: it must carry every attribute `Scorer.__init__` sets,
    or a new one in scorer.py breaks TP scoring only at run time."""
    from fjordtune.eval.scorer import Scorer
    from fjordtune.eval.tp import scorer_for_model

    built = Scorer(str(tiny_model_dir), dtype="float32")
    around = scorer_for_model(built.model)
    assert sorted(vars(around)) == sorted(vars(built))
    assert {k: v for k, v in vars(around).items() if k != "model"} == {k: v for k, v in vars(built).items() if k != "model"}


def test_placement_is_tensor_parallel_where_the_plan_splits_evenly_else_device_map():
    """`eval.placement: auto` on the story's model: tensor parallel over 2 or 4 GPUs, device_map over 3 or 7
    (131,072 vocabulary rows do not split into 3); a model without a plan gets device_map; asking for
    tensor_parallel where it cannot be is an error that says why; one GPU or CPUs need no placement."""
    import transformers

    from fjordtune.errors import UserError
    from fjordtune.eval.tp import replica_placement
    from fjordtune.model.load import builtin_config

    mistral = builtin_config("mistral-small-4")
    assert replica_placement(mistral, gpus=4, use_gpu=True) == ("tensor_parallel", 4)
    assert replica_placement(mistral, gpus=2, use_gpu=True) == ("tensor_parallel", 2)
    assert replica_placement(mistral, gpus=3, use_gpu=True) == ("device_map", 1)
    assert replica_placement(mistral, gpus=4, use_gpu=True, requested="device_map") == ("device_map", 1)
    assert replica_placement(mistral, gpus=1, use_gpu=True) == ("single", 1)
    assert replica_placement(mistral, gpus=0, use_gpu=False, requested="tensor_parallel") == ("single", 1)
    with pytest.raises(UserError, match="vocab_size=131072"):
        replica_placement(mistral, gpus=7, use_gpu=True, requested="tensor_parallel")
    gpt2 = transformers.GPT2Config()
    assert replica_placement(gpt2, gpus=4, use_gpu=True) == ("device_map", 1)
    with pytest.raises(UserError, match="no tensor-parallel plan for GPT2Config"):
        replica_placement(gpt2, gpus=4, use_gpu=True, requested="tensor_parallel")
