"""The NorEval protocol against lm-eval's own `hf` model: chat template (its retry without the system
role, `chat_template_args`), `system_instruction`, few-shot counts per task pattern, NorCommonsenseQA's
scored question kept out of its own shots, and the protocol recorded in results.json. Real lm-eval, real
Ray (local), bundled NorEval samples, no mocks of lm-eval."""

from __future__ import annotations

import json
import logging
import shutil
import types
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.integration

import fjordtune

ROOT = Path(fjordtune.__file__).resolve().parents[2]
DATA = ROOT / "src" / "fjordtune" / "samples" / "noreval"
SYSTEM = "Du er en hjelpsom assistent. Svar kort."
NOTHINK = "[NOTHINK]"
# Mistral/Gemma style: a system message is refused with raise_exception, so lm-eval's hf model renders
# every prompt again without it. `enable_thinking` (from chat_template_args) leaves a visible mark.
NO_SYSTEM_TEMPLATE = """\
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {{- raise_exception('System role not supported') -}}
    {%- endif -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
    {%- endif -%}
    {%- if message['role'] == 'user' -%}
        {{- bos_token ~ '[INST] ' ~ message['content'] ~ ' [/INST]' -}}
    {%- else -%}
        {{- ' ' ~ message['content'] ~ eos_token -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and enable_thinking is defined and not enable_thinking -%}
    {{- ' """ + NOTHINK + """' -}}
{%- endif -%}
"""
K_SHOT = {"norcommonsenseqa_*": 2, "noropenbookqa_*": 2, "nrk_quiz_qa_*": 2}  # NRK stays 0-shot: NorEval fixes it


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def no_system_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The session's tiny model with a chat template that refuses a system role (the fixture folder
    itself is left as it is)."""
    folder = tmp_path_factory.mktemp("no-system") / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").write_text(NO_SYSTEM_TEMPLATE)
    return folder


def make_job(**eval_keys: Any):
    from fjordtune.config.load import read_yaml, validate_raw

    raw = read_yaml(ROOT / "jobs" / "demo.yaml")
    raw["eval"] = {**raw["eval"], "data_dir": str(DATA), **eval_keys}
    return validate_raw(raw, source="test")


def evaluate_job(lm, job) -> dict[str, Any]:
    """lm-eval's `evaluate` on freshly built tasks (a task's few-shot sampler is used up by one run)."""
    import lm_eval.evaluator

    from fjordtune.eval.run import build_tasks, prompt_kwargs

    _, task_dict = build_tasks(job)
    return lm_eval.evaluator.evaluate(lm=lm, task_dict=task_dict, bootstrap_iters=0, log_samples=True,
                                      **prompt_kwargs(job))


# ---------------------------------------------------------------- chat template: ours == hf


def test_render_chat_is_hf_apply_chat_template_and_warns_once(no_system_model_dir, monkeypatch, caplog):
    """Same strings as lm-eval's own `HFLM.apply_chat_template` (called on a stand-in holding only what
    it reads), system message refused and dropped, chat_template_args passed; one warning, not one per prompt."""
    from lm_eval.models.huggingface import HFLM

    from fjordtune.eval import chat
    from fjordtune.model.load import load_tokenizer

    monkeypatch.setattr(chat, "_WARNED", set())
    tok = load_tokenizer(str(no_system_model_dir))
    args = {"enable_thinking": False}
    hf = types.SimpleNamespace(tokenizer=tok, chat_template_args=args)
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Spørsmål {i}"}] for i in range(3)]
    chats.append([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}])
    with caplog.at_level(logging.WARNING):
        for history in chats:
            ours = chat.render_chat(tok, history, chat_template_args=args)
            assert ours == HFLM.apply_chat_template(hf, history)
            assert SYSTEM not in ours and ours.endswith(NOTHINK)
    assert [r.name for r in caplog.records].count("fjordtune.eval.chat") == 1
    assert [r.name for r in caplog.records].count("lm_eval.models.huggingface") == 3  # hf: once per prompt


@pytest.mark.parametrize("num_fewshot", [0, K_SHOT], ids=["0-shot", "2-shot"])
def test_chat_template_scores_equal_lm_eval_hf_on_all_40_tasks(ray_local, no_system_model_dir, num_fewshot,
                                                             monkeypatch, caplog):
    from lm_eval.models.huggingface import HFLM
    from transformers import Mistral4ForCausalLM

    from fjordtune.eval import chat
    from fjordtune.eval.noreval import task_names
    from fjordtune.eval.ray_lm import RayDataLM
    from fjordtune.model.load import load_tokenizer

    monkeypatch.setattr(chat, "_WARNED", set())
    job = make_job(tasks=task_names(), num_fewshot=num_fewshot, apply_chat_template=True,
                   chat_template_args={"enable_thinking": False}, system_instruction=SYSTEM)
    assert job.eval.effective_fewshot_as_multiturn  # as lm-eval's CLI runs hf with --apply_chat_template
    tok = load_tokenizer(str(no_system_model_dir))
    reference = Mistral4ForCausalLM.from_pretrained(str(no_system_model_dir), dtype=torch.float32)
    hf = HFLM(pretrained=reference, tokenizer=tok, batch_size=8, chat_template_args=job.eval.chat_template_args)
    ours = RayDataLM(model_uri=str(no_system_model_dir), tokenizer=tok, dtype="float32", num_workers=2,
                     batch_size=32, chat_template_args=job.eval.chat_template_args)
    ref = evaluate_job(hf, job)
    with caplog.at_level(logging.WARNING, logger="fjordtune.eval.chat"):
        got = evaluate_job(ours, job)
    assert [r.name for r in caplog.records].count("fjordtune.eval.chat") == 1  # the fallback, said once

    assert set(got["results"]) == set(ref["results"]) == set(task_names())
    for task in task_names():
        expected_shots = 2 if num_fewshot and task.startswith(("norcommonsenseqa", "noropenbookqa")) else 0
        assert got["configs"][task]["num_fewshot"] == ref["configs"][task]["num_fewshot"] == expected_shots
        for metric in ("acc,none", "acc_norm,none"):
            assert (metric in ref["results"][task]) == (metric in got["results"][task])
            if metric in ref["results"][task]:
                assert got["results"][task][metric] == ref["results"][task][metric], (task, metric)
        ref_args = [a for s in ref["samples"][task] for a in s["arguments"]]
        got_args = [a for s in got["samples"][task] for a in s["arguments"]]
        assert got_args == ref_args  # the same prompts, to the character
        for ctx, _ in got_args:
            # the template refused the system role: dropped, as hf drops it; chat_template_args reached it
            assert SYSTEM not in ctx and ctx.endswith(NOTHINK) and ctx.count("[INST]") == expected_shots + 1
        ref_ll = [float(r[0][0]) for s in ref["samples"][task] for r in s["resps"]]
        got_ll = [float(r[0][0]) for s in got["samples"][task] for r in s["resps"]]
        assert len(ref_ll) == len(got_ll) > 0
        assert max(abs(a - b) for a, b in zip(ref_ll, got_ll, strict=True)) < 1e-4, task


# ---------------------------------------------------------------- NorCommonsenseQA: no question among its own shots


def _contexts(task_dict: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """(question, context) of every request lm-eval builds, built as `lm_eval.evaluator.evaluate` does."""
    out = {}
    for name, task in task_dict["tasks"].items():
        task.build_all_requests(limit=None, rank=0, world_size=1)
        out[name] = [(inst.doc["question"], inst.args[0]) for inst in task.instances]
    return out


@pytest.mark.parametrize("num_fewshot", [2, 5])
def test_norcommonsenseqa_question_is_never_among_its_own_shots(num_fewshot, monkeypatch):
    from fjordtune.eval import noreval
    from fjordtune.eval.run import task_manager

    names = noreval.task_names(["norcommonsenseqa"])
    fixed = _contexts(noreval.build_task_dict(names, DATA, num_fewshot=num_fewshot, task_manager=task_manager()))
    for name, requests in fixed.items():
        assert len(requests) > 6  # every choice of every doc
        for question, ctx in requests:
            assert ctx.count(question) == 1, (name, question)

    # the registered config (no fewshot_split: what lm-eval builds by default) leaks on the same data:
    # with the same seed, in every one of the 10 tasks
    monkeypatch.setattr(noreval, "scored_split_fewshot", lambda task_name: {})
    leaky = _contexts(noreval.build_task_dict(names, DATA, num_fewshot=num_fewshot, task_manager=task_manager()))
    assert {name for name, requests in leaky.items() if any(ctx.count(q) > 1 for q, ctx in requests)} == set(names)


def test_hub_loading_builds_norcommonsenseqa_with_its_fewshot_split():
    """Without `eval.data_dir` the registered tasks are loaded by name; NorCommonsenseQA ones (named or
    through their tag) are built with `fewshot_split` in their config, the others as lm-eval builds them."""
    from lm_eval.tasks._index import Entry, Kind

    from fjordtune.eval.noreval import load_registered

    class RecordingManager:
        task_index = {"norcommonsenseqa_nno": Entry("norcommonsenseqa_nno", Kind.TAG, None,
                                                    tags={"norcommonsenseqa_nno_p1", "norcommonsenseqa_nno_p0"})}

        def __init__(self) -> None:
            self.calls: list[Any] = []

        def load(self, spec: Any) -> dict[str, Any]:
            self.calls.append(spec)
            if isinstance(spec, dict):  # the wrapper group: its members' configs, as built tasks
                return {"tasks": {m["task"]: ("built", m["fewshot_split"]) for m in spec["task"]}}
            return {"tasks": spec}

    tm = RecordingManager()
    loaded = load_registered(["norcommonsenseqa_nob_p3", "noropenbookqa_nob_p0", "norcommonsenseqa_nno", "arc_easy"],
                             tm)
    assert tm.calls[0]["task"] == [{"task": n, "fewshot_split": "train"} for n in
                                   ("norcommonsenseqa_nob_p3", "norcommonsenseqa_nno_p0", "norcommonsenseqa_nno_p1")]
    assert loaded["tasks"] == [("built", "train"), "noropenbookqa_nob_p0", ("built", "train"), ("built", "train"),
                               "arc_easy"]


# ---------------------------------------------------------------- few-shot counts per task pattern (no Ray)


def test_fewshot_mapping_first_match_wins_and_unmatched_keep_their_default():
    from fjordtune.eval.noreval import fewshot_counts

    names = ["norcommonsenseqa_nob_p0", "norcommonsenseqa_nno_p0", "noropenbookqa_nob_p1", "nrk_quiz_qa_nob_p0"]
    counts = fewshot_counts(names, {"norcommonsenseqa_nob_*": 5, "norcommonsenseqa_*": 16, "noropenbookqa_*": 3,
                                    "norcommonsenseqa_nno_*": 1})
    assert counts == {"norcommonsenseqa_nob_p0": 5, "norcommonsenseqa_nno_p0": 16, "noropenbookqa_nob_p1": 3,
                      "nrk_quiz_qa_nob_p0": None}
    assert fewshot_counts(names, 4) == dict.fromkeys(names, 4)
    assert fewshot_counts(names, None) == dict.fromkeys(names, None)


def test_fewshot_pattern_matching_no_task_is_named_with_the_closest_tasks():
    from fjordtune.errors import UserError
    from fjordtune.eval.noreval import fewshot_counts, task_names

    with pytest.raises(UserError) as info:
        fewshot_counts(task_names(), {"noropenbookqa_*": 16, "noropenbokqa_nob_*": 16, "squad*": 1})
    assert info.value.lines[0].startswith("eval.num_fewshot.noropenbokqa_nob_*: matches none of the job's 40 tasks "
                                          "(closest: noropenbookqa_nob_")
    assert info.value.lines[1] == "eval.num_fewshot.squad*: matches none of the job's 40 tasks"


class FakeTask:
    """What `apply_fewshot` touches on an lm-eval Task."""

    def __init__(self, num_fewshot: int | None) -> None:
        self.cfg: dict[str, Any] = {"num_fewshot": num_fewshot}
        self.fewshot_cfg = types.SimpleNamespace(split=None)
        self.config = types.SimpleNamespace(test_split="test")
        self.seed: int | None = None

    def get_config(self, key: str) -> Any:
        return self.cfg[key]

    def set_config(self, key: str, value: Any) -> None:
        self.cfg[key] = value

    def set_fewshot_seed(self, seed: int | None = None) -> None:
        self.seed = seed


def test_tasks_noreval_fixes_at_zero_shot_stay_there_with_one_warning_line(caplog):
    from fjordtune.eval.noreval import apply_fewshot, task_names

    # the registered configs: TruthfulQA and NRK say num_fewshot: 0, CSQA and OBQA say nothing
    tasks = {n: FakeTask(0 if n.startswith(("nrk", "nortruthful")) else None) for n in task_names()}
    with caplog.at_level(logging.WARNING, logger="fjordtune.eval.noreval"):
        apply_fewshot(tasks, {"noropenbookqa_*": 16, "nrk_quiz_qa_*": 16, "nortruthfulqa_mc_nob_p0": 3}, seed=7)
    counts = {n: t.get_config("num_fewshot") for n, t in tasks.items()}
    assert {n for n, c in counts.items() if c} == set(task_names(["noropenbookqa"]))
    assert all(c == 0 for n, c in counts.items() if not n.startswith("noropenbookqa"))
    assert {t.seed for t in tasks.values()} == {7}
    assert [r.getMessage() for r in caplog.records] == [
        "0-shot kept for 11 task(s) whose config fixes num_fewshot: 0, as lm-eval does: "
        "nortruthfulqa_mc_nob_p0, nrk_quiz_qa_nob_p{0,1,2,3,4}, nrk_quiz_qa_nno_p{0,1,2,3,4}"]


@pytest.mark.parametrize(("value", "message"), [
    (-1, "expected a whole number >= 0"),
    ("16", "expected a whole number >= 0"),
    (True, "expected a whole number >= 0"),
    ({"noropenbookqa_*": -2}, "the count for 'noropenbookqa_*' must be a whole number >= 0, not -2"),
    ({"noropenbookqa_*": "16"}, "the count for 'noropenbookqa_*' must be a whole number >= 0, not '16'"),
])
def test_bad_num_fewshot_is_a_clear_config_error(value, message):
    from fjordtune.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        make_job(num_fewshot=value)
    assert len(info.value.lines) == 1
    assert info.value.lines[0].startswith(f"test: eval.num_fewshot: {message}"), info.value.lines


def test_chat_keys_are_checked_like_lm_eval_checks_them():
    from fjordtune.errors import ConfigError

    assert make_job().eval.effective_fewshot_as_multiturn is False
    assert make_job(apply_chat_template=True).eval.effective_fewshot_as_multiturn is True
    assert make_job(apply_chat_template=True, fewshot_as_multiturn=False).eval.effective_fewshot_as_multiturn is False
    with pytest.raises(ConfigError, match="eval.fewshot_as_multiturn: true needs eval.apply_chat_template: true"):
        make_job(fewshot_as_multiturn=True)
    with pytest.raises(ConfigError, match="eval.chat_template_args: add_generation_prompt: lm-eval sets these"):
        make_job(chat_template_args={"add_generation_prompt": False})


# ---------------------------------------------------------------- the protocol in results.json


def test_protocol_records_shots_splits_exclusion_seed_and_prompt_arguments():
    import lm_eval

    from fjordtune.eval.chat import template_sha256
    from fjordtune.eval.noreval import DEFAULT_FEWSHOT_SEED, build_task_dict
    from fjordtune.eval.run import protocol_of, task_manager

    names = ["norcommonsenseqa_nno_p1", "noropenbookqa_nob_p0", "nortruthfulqa_mc_nob_p2", "nrk_quiz_qa_nno_p0"]
    job = make_job(tasks=names, num_fewshot={"nor*": 16}, apply_chat_template=True,
                   chat_template_args={"enable_thinking": False}, system_instruction=SYSTEM)
    task_dict = build_task_dict(names, DATA, num_fewshot=job.eval.num_fewshot, task_manager=task_manager())
    protocol = protocol_of(task_dict, job, chat_template=NO_SYSTEM_TEMPLATE)
    assert protocol["tasks"] == {
        "norcommonsenseqa_nno_p1": {"num_fewshot": 16, "fewshot_split": "train", "excludes_scored_doc": True,
                                    "fewshot_seed": DEFAULT_FEWSHOT_SEED},
        "noropenbookqa_nob_p0": {"num_fewshot": 16, "fewshot_split": "train", "excludes_scored_doc": False,
                                 "fewshot_seed": DEFAULT_FEWSHOT_SEED},
        "nortruthfulqa_mc_nob_p2": {"num_fewshot": 0, "fewshot_split": None, "excludes_scored_doc": None,
                                    "fewshot_seed": None},
        "nrk_quiz_qa_nno_p0": {"num_fewshot": 0, "fewshot_split": None, "excludes_scored_doc": None,
                               "fewshot_seed": None},
    }
    assert {k: v for k, v in protocol.items() if k != "tasks"} == {
        "apply_chat_template": True, "chat_template_args": {"enable_thinking": False}, "system_instruction": SYSTEM,
        "fewshot_as_multiturn": True, "chat_template_sha256": template_sha256(NO_SYSTEM_TEMPLATE),
        "lm_eval_version": lm_eval.__version__,
    }
    json.dumps(protocol, allow_nan=False)  # goes into results.json as it is

    plain = protocol_of(task_dict, make_job(tasks=names, chat_template_args={"enable_thinking": False}))
    assert plain["apply_chat_template"] is False and plain["fewshot_as_multiturn"] is False
    assert plain["chat_template_args"] == {} and plain["chat_template_sha256"] is None  # not applied: not recorded


def test_a_noreval_job_indexes_noreval_alone_and_anything_else_the_whole_registry() -> None:
    """NorEval names and patterns resolve in an index of lm-eval's `noreval` folder alone (the same YAML
    files, so the same tasks, without indexing ~14,700 others); another benchmark or a typo gets the full
    registry (its tasks, and its spelling suggestions)."""
    from fjordtune.errors import UserError
    from fjordtune.eval.run import expand_tasks, task_manager

    small = task_manager(["nrk_quiz_qa_*", "noropenbookqa_nob_p0"])
    full = task_manager()
    assert small is not full and len(small.all_tasks) < len(full.all_tasks) / 50
    in_noreval = sorted(n for n in full.all_subtasks if "/noreval/" in str(full.task_index[n].yaml_path))
    assert len(in_noreval) >= 100 and sorted(small.all_subtasks) == in_noreval
    assert small.task_index["nrk_quiz_qa_nob_p0"].yaml_path == full.task_index["nrk_quiz_qa_nob_p0"].yaml_path
    assert task_manager(["nrk_quiz_qa_nob_p0", "arc_easy"]) is full
    assert task_manager(["nrk_quiz_qa_nob_p9"]) is full
    with pytest.raises(UserError, match="did you mean"):
        expand_tasks(["nrk_quiz_qa_nob_p9"], known=list(full.all_tasks))
