"""`fjordtune serve`: a real Ray Serve application on a real local Ray cluster, the run's adapter read from a
real S3 server and merged inside the replica, asked through the `openai` client over loopback HTTP.

The reference is transformers itself: the same adapter merged by `fjordtune export`, loaded with
`Mistral4ForCausalLM.from_pretrained`, prompted with `apply_chat_template` and `generate(do_sample=False)`.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from pathlib import Path

import pytest
import requests
from conftest import make_lora_adapter

from fjordtune.cli import main
from fjordtune.devstack import free_port

pytestmark = pytest.mark.integration

MODEL = "demo-tuned"
MAX_TOKENS, MAX_CONCURRENT, MAX_QUEUED = 48, 2, 4
PROMPTS = [
    [{"role": "user", "content": "Hva er hovedstaden i Norge?"}],
    [{"role": "system", "content": "Svar kort."}, {"role": "user", "content": "Kva heiter den lengste elva?"}],
    [{"role": "user", "content": "Hei"}, {"role": "assistant", "content": "Hei! Korleis kan eg hjelpe?"},
     {"role": "user", "content": "Fortel om fjordar."}],
]


@pytest.fixture(scope="module")
def served(s3_server, tiny_model_dir, tmp_path_factory):
    """The demo job's model (the session's tiny Mistral4) with a random adapter on attention and experts, the
    adapter committed where a finished run leaves it, served with `fjordtune serve` on a free port."""
    import ray

    from fjordtune.storage.store import Store

    saved = dict(os.environ)
    os.environ.update(s3_server.env)  # the cluster's workers (the replica) inherit the keys, as on a real head
    tmp = tmp_path_factory.mktemp("serve")
    adapter = make_lora_adapter(tiny_model_dir, tmp / "adapter")
    store = Store()
    store.ensure_bucket("s3://serve-test")
    store.upload_dir(adapter, "s3://serve-test/runs/demo/adapter")
    port = free_port()
    args = ["jobs/demo.yaml", "--set", f"model.path={tiny_model_dir}", "--set", "storage.uri=s3://serve-test/runs",
            "--set", f"storage.cache_dir={tmp / 'cache'}", "--model-name", MODEL, "--port", str(port),
            "--max-tokens", str(MAX_TOKENS), "--max-concurrent", str(MAX_CONCURRENT), "--max-queued", str(MAX_QUEUED)]
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        assert main(["serve", *args]) == 0
        yield {"url": f"http://127.0.0.1:{port}", "args": args, "adapter": adapter, "tmp": tmp}
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def reference(served, tiny_model_dir):
    """transformers' greedy answers of the merged model (and of the base, to show the adapter matters)."""
    import torch
    from transformers import AutoTokenizer, Mistral4ForCausalLM

    from fjordtune.export.merged import export_merged

    merged = export_merged(tiny_model_dir, served["adapter"], served["tmp"] / "merged", dtype="float32").out_dir
    tok = AutoTokenizer.from_pretrained(merged)

    def answers(folder: Path) -> list[tuple[str, int, int]]:
        model = Mistral4ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        out = []
        for messages in PROMPTS:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)["input_ids"]
            with torch.inference_mode():
                gen = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
            out.append((tok.decode(gen, skip_special_tokens=True), ids.shape[1], len(gen)))
        return out

    return {"merged": answers(merged), "base": answers(tiny_model_dir)}


def _client(served):
    from openai import OpenAI

    return OpenAI(base_url=served["url"] + "/v1", api_key="none", max_retries=0, timeout=120)


def test_models_lists_the_served_model_and_serve_shows_the_application(served):
    from ray import serve

    app = serve.status().applications["fjordtune-demo-tuned"]  # what the dashboard's Serve tab lists
    assert app.status == "RUNNING" and set(app.deployments) == {"chat"}
    models = _client(served).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "fjordtune"


def test_chat_answers_equal_transformers_greedy_generate_streaming_and_not(served, reference):
    assert reference["merged"] != reference["base"], "the adapter should change the greedy answers"
    client = _client(served)
    for messages, (expected, prompt_tokens, new_tokens) in zip(PROMPTS, reference["merged"]):
        reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)
        assert reply.choices[0].message.content == expected
        assert reply.usage.prompt_tokens == prompt_tokens and reply.usage.completion_tokens == new_tokens
        assert reply.choices[0].finish_reason == ("length" if new_tokens == 24 else "stop")
        stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24,
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1, "streamed in pieces"
        assert chunks[-1].usage.completion_tokens == new_tokens
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason


def test_stop_sequences_cut_the_answer_as_openai_does(served, reference):
    client = _client(served)
    expected = reference["merged"][0][0]
    stop = expected.strip().split()[1] if len(expected.split()) > 2 else expected[3:6]
    reply = client.chat.completions.create(model=MODEL, messages=PROMPTS[0], temperature=0, max_tokens=24, stop=stop)
    assert reply.choices[0].message.content == expected[: expected.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=PROMPTS[0], temperature=0, max_tokens=24, stop=[stop], stream=True) if c.choices)
    assert streamed == reply.choices[0].message.content


def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(served):
    import openai

    client = _client(served)
    with pytest.raises(openai.NotFoundError, match="does not exist on this server; it serves `demo-tuned`"):
        client.chat.completions.create(model="gpt-4o", messages=PROMPTS[0])
    with pytest.raises(openai.BadRequestError, match=f"max_tokens=4096 is over this server's limit of {MAX_TOKENS}"):
        client.chat.completions.create(model=MODEL, messages=PROMPTS[0], max_tokens=4096)
    url = served["url"] + "/v1/chat/completions"
    bad = {
        "no messages": ({"model": MODEL, "messages": []}, "messages: List should have at least 1 item"),
        "unknown role": ({"model": MODEL, "messages": [{"role": "robot", "content": "hei"}]}, "messages.0.role"),
        "no content": ({"model": MODEL, "messages": [{"role": "user"}]}, "messages.0.content"),
        "not a list": ({"model": MODEL, "messages": "hei"}, "messages"),
        "role order": ({"model": MODEL, "messages": [{"role": "assistant", "content": "hei"}]},
                       "chat template refuses this conversation"),
        "n > 1": ({"model": MODEL, "messages": PROMPTS[0], "n": 2}, "one choice per request"),
    }
    for what, (body, message) in bad.items():
        r = requests.post(url, json=body, timeout=60)
        assert r.status_code == 400, (what, r.status_code, r.text)
        assert message in r.json()["error"]["message"], (what, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = requests.post(url, data=b"{not json", headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    reply = client.chat.completions.create(model=MODEL, messages=PROMPTS[0], max_tokens=4)
    assert reply.usage.completion_tokens == 4 and reply.choices[0].finish_reason == "length"


def test_fifty_concurrent_requests_succeed_or_get_503_and_nothing_hangs(served):
    url = served["url"] + "/v1/chat/completions"
    body = {"model": MODEL, "messages": PROMPTS[0], "temperature": 0, "max_tokens": 8}

    def ask(_: int) -> tuple[int, str]:
        r = requests.post(url, json=body, timeout=120)
        return r.status_code, r.text

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(ask, range(50)))
    codes = [code for code, _ in results]
    assert set(codes) <= {200, 503}, codes
    answers = {json.loads(text)["choices"][0]["message"]["content"] for code, text in results if code == 200}
    assert codes.count(200) >= MAX_CONCURRENT and len(answers) == 1, (codes, answers)
    assert 503 in codes, f"50 at once against {MAX_CONCURRENT} + {MAX_QUEUED} queued: the limit should reject some"
    assert requests.get(served["url"] + "/health", timeout=30).json()["status"] == "ok"
    assert requests.post(url, json=body, timeout=60).status_code == 200


def test_down_deletes_the_application(served, capsys):
    assert main(["serve", *served["args"], "--down"]) == 0
    assert "fjordtune-demo-tuned deleted" in capsys.readouterr().out
    with pytest.raises(requests.RequestException):
        requests.get(served["url"] + "/v1/models", timeout=10).raise_for_status()


def test_a_model_that_fails_to_load_is_one_line_after_three_tries_and_a_missing_shard_is_refused_first(
        served, tiny_model_dir, capsys):
    """After `--down`: a merged folder whose shard is cut in half passes the listing check, fails in the replica
    (3 constructor tries, not Serve's 20), and `fjordtune serve` ends with exit 3 and the loader's own error."""
    import shutil

    broken = served["tmp"] / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (shard,) = broken.glob("*.safetensors")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert main(["serve", *served["args"], "--merged", str(broken)]) == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "did not start (3 tries)" in errors[0] and "SafetensorError" in errors[0], errors
    shard.unlink()
    assert main(["serve", *served["args"], "--merged", str(broken)]) == 2
    assert "model.safetensors" in capsys.readouterr().err
