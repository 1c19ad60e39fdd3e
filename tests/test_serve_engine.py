"""The serving core without Ray: request checks (`serve/protocol.py`), the transformers engine
(`serve/engine.py`) on the tiny Mistral4, and what `fjordtune serve` refuses before it joins or starts Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fjordtune.cli import main
from fjordtune.serve.protocol import ApiError, Limits, new_tokens_for, parse_chat_request

REPO = Path(__file__).resolve().parents[1]
LIMITS = Limits(max_tokens=32, context_length=64)
HELLO = [{"role": "user", "content": "Hei, hvordan går det?"}]


def _parse(**body):
    return parse_chat_request({"model": "m", "messages": HELLO, **body}, served_model="m", limits=LIMITS)


@pytest.mark.parametrize("body, status, fragment", [
    ({"model": "other"}, 404, "does not exist on this server; it serves `m`"),
    ({"messages": []}, 400, "messages: List should have at least 1 item"),
    ({"messages": [{"role": "user", "content": 3}]}, 400, "messages.0.content"),
    ({"max_tokens": 33}, 400, "max_tokens=33 is over this server's limit of 32"),
    ({"max_completion_tokens": 99}, 400, "max_completion_tokens=99"),
    ({"max_tokens": 0}, 400, "max_tokens: Input should be greater than or equal to 1"),
    ({"temperature": 3}, 400, "temperature"),
    ({"n": 2}, 400, "one choice per request"),
    ({"logprobs": True}, 400, "logprobs are not supported"),
    ({"frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
])
def test_bad_requests_are_refused_with_openai_errors(body, status, fragment):
    with pytest.raises(ApiError) as e:
        _parse(**body)
    assert e.value.status == status and fragment in e.value.message
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_extra_fields_are_accepted_and_developer_is_the_system_role():
    req = _parse(user="u-1", developer_note="x", messages=[{"role": "developer", "content": "Kort."}, *HELLO])
    assert req.chat()[0] == {"role": "system", "content": "Kort."}
    parts = _parse(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert parts.chat() == [{"role": "user", "content": "ab"}]


def test_new_tokens_fit_the_context_or_the_request_is_refused():
    assert new_tokens_for(_parse(), prompt_tokens=10, limits=LIMITS) == 32
    assert new_tokens_for(_parse(), prompt_tokens=50, limits=LIMITS) == 14  # no max_tokens: what is left
    assert new_tokens_for(_parse(max_tokens=8), prompt_tokens=50, limits=LIMITS) == 8
    with pytest.raises(ApiError, match="maximum context length is 64 tokens; the messages take 60") as e:
        new_tokens_for(_parse(max_tokens=8), prompt_tokens=60, limits=LIMITS)
    assert e.value.code == "context_length_exceeded"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from fjordtune.serve.engine import ChatEngine

    return ChatEngine.from_folder(str(tiny_model_dir), model_id="m", max_tokens=32)


def test_greedy_completion_is_transformers_generate_and_the_stream_says_the_same(engine):
    ids = engine.tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"]
    with torch.inference_mode():
        want = engine.model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:]
    text = engine.tokenizer.decode(want, skip_special_tokens=True)
    req = _parse(temperature=0, max_tokens=20)
    done = engine.complete(engine.prepare(req))
    assert done["choices"][0]["message"]["content"] == text
    assert done["usage"] == {"prompt_tokens": ids.shape[1], "completion_tokens": len(want),
                             "total_tokens": ids.shape[1] + len(want)}
    chunks = list(engine.stream(engine.prepare(req.model_copy(update={"stream": True}))))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == done["choices"][0]["finish_reason"]
    assert len({c["id"] for c in chunks}) == 1


def test_a_stop_sequence_is_never_streamed_even_in_part(engine):
    full = engine.complete(engine.prepare(_parse(temperature=0, max_tokens=24)))["choices"][0]["message"]["content"]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    req = _parse(temperature=0, max_tokens=24, stop=stop)
    assert engine.complete(engine.prepare(req))["choices"][0]["message"]["content"] == cut
    deltas = [c["choices"][0]["delta"].get("content", "") for c in engine.stream(engine.prepare(req))]
    assert "".join(deltas) == cut and all(stop not in d for d in deltas)


def test_sampling_with_a_seed_repeats_and_a_refused_conversation_is_a_400(engine):
    req = _parse(temperature=1.0, top_p=0.9, seed=7, max_tokens=12)
    first = engine.complete(engine.prepare(req))["choices"][0]["message"]["content"]
    assert engine.complete(engine.prepare(req))["choices"][0]["message"]["content"] == first
    with pytest.raises(ApiError, match="chat template refuses this conversation: Conversation roles must be"):
        engine.prepare(_parse(messages=[{"role": "assistant", "content": "hei"}]))


def _serve(*args: str) -> int:
    return main(["serve", str(REPO / "jobs/demo.yaml"), *args])


def test_serve_refuses_before_ray_is_joined(tmp_path, tiny_model_dir, capsys):
    import ray

    assert _serve("--adapter", str(tmp_path / "a"), "--merged", str(tmp_path / "m")) == 2
    assert "give --adapter or --merged, not both" in capsys.readouterr().err
    assert _serve("--adapter", str(tmp_path / "missing")) == 2
    assert "no committed adapter there" in capsys.readouterr().err
    assert _serve("--engine", "vllm", "--set", f"storage.uri={tmp_path}/runs") == 2
    assert "run `fjordtune export JOB --format merged` first" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _serve("--merged", str(tmp_path / "empty")) == 2
    assert "no such model folder, or it is empty" in capsys.readouterr().err
    assert _serve("--engine", "vllm", "--merged", str(tiny_model_dir)) == 2
    assert "--engine vllm needs vLLM" in capsys.readouterr().err
    assert _serve("--max-tokens", "0") == 2
    assert not ray.is_initialized()


def test_vllm_config_spreads_the_merged_model_over_the_job_gpus():
    from fjordtune.config import load_job
    from fjordtune.serve.app import ModelSource, ServeOptions, vllm_llm_config

    job = load_job(str(REPO / "jobs/norskmistral-119b.yaml"), [])
    cfg = vllm_llm_config(job, ModelSource(merged="s3://b/runs/x/export/merged"),
                          ServeOptions(model_id="norsk", max_concurrent=8, max_queued=32))
    assert cfg["model_loading_config"] == {"model_id": "norsk", "model_source": {"bucket_uri": "s3://b/runs/x/export/merged"}}
    assert cfg["engine_kwargs"]["tensor_parallel_size"] == min(job.resources.num_workers, job.resources.gpus_per_node, 8)
    assert cfg["deployment_config"]["max_ongoing_requests"] == 8 and cfg["deployment_config"]["max_queued_requests"] == 32


def test_the_transformers_engine_takes_the_gpus_that_hold_the_model_or_is_refused():
    from fjordtune.config import load_job
    from fjordtune.errors import UserError
    from fjordtune.preflight.gate import capacity, count, estimate_eval
    from fjordtune.serve.app import gpus_for_transformers

    assert gpus_for_transformers(load_job(str(REPO / "jobs/demo.yaml"), [])) == 0
    offline = ["model.path=builtin:mistral-small-4"]  # the release's config, no download
    job = load_job(str(REPO / "jobs/norskmistral-119b.yaml"), offline)  # 119B in bf16 on 80 GB H100s
    gpus = gpus_for_transformers(job)
    counts, cap = count(job), capacity(job)[0]
    assert 1 < gpus <= job.resources.gpus_per_node
    assert estimate_eval(job, counts, cap, gpus=gpus).fits and not estimate_eval(job, counts, cap, gpus=gpus - 1).fits
    with pytest.raises(UserError, match="more than the 2 GPUs of one node hold; serve it with --engine vllm"):
        gpus_for_transformers(load_job(str(REPO / "jobs/norskmistral-119b.yaml"), [*offline, "resources.gpus_per_node=2"]))
