"""Our Ray Data scorer against lm-eval's own `hf` model: same model, same local NorEval data, same
scores. Real lm-eval, real Ray (local), no mocks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

import fjordtune

ROOT = Path(fjordtune.__file__).resolve().parents[2]
DATA = ROOT / "src" / "fjordtune" / "samples" / "noreval"
TASKS = [
    "norcommonsenseqa_nob_p0", "norcommonsenseqa_nno_p3", "noropenbookqa_nob_p1", "noropenbookqa_nno_p0",
    "nortruthfulqa_mc_nob_p0", "nortruthfulqa_mc_nno_p2", "nrk_quiz_qa_nob_p0", "nrk_quiz_qa_nno_p4",
]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _evaluate(lm, *, num_fewshot):
    import lm_eval.evaluator

    from fjordtune.eval.noreval import build_task_dict
    from fjordtune.eval.run import task_manager

    task_dict = build_task_dict(TASKS, DATA, num_fewshot=num_fewshot, task_manager=task_manager())
    return lm_eval.evaluator.evaluate(lm=lm, task_dict=task_dict, bootstrap_iters=0, log_samples=True)


@pytest.mark.parametrize("num_fewshot", [0, 2])
def test_ray_data_scores_equal_lm_eval_hf(ray_local, tiny_model_dir, num_fewshot):
    from lm_eval.models.huggingface import HFLM
    from transformers import Mistral4ForCausalLM

    from fjordtune.eval.ray_lm import RayDataLM
    from fjordtune.model.load import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    # the reference loads through transformers' own loader, independent of ours
    reference = Mistral4ForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    hf = HFLM(pretrained=reference, tokenizer=tok, batch_size=8)
    ours = RayDataLM(model_uri=str(tiny_model_dir), tokenizer=tok, dtype="float32", num_workers=2, batch_size=16)
    ref, got = _evaluate(hf, num_fewshot=num_fewshot), _evaluate(ours, num_fewshot=num_fewshot)
    assert ours.num_scored > 0
    for task in TASKS:
        for metric in ("acc,none", "acc_norm,none"):
            assert (metric in ref["results"][task]) == (metric in got["results"][task])
            if metric in ref["results"][task]:
                assert got["results"][task][metric] == ref["results"][task][metric], (task, metric)
        # per-request log-likelihoods, not just the accuracies
        ref_ll = [r[0] for s in ref["samples"][task] for r in s["resps"]]
        got_ll = [r[0] for s in got["samples"][task] for r in s["resps"]]
        assert len(ref_ll) == len(got_ll) > 0
        assert max(abs(float(a[0]) - float(b[0])) for a, b in zip(ref_ll, got_ll)) < 1e-3


def test_summarize_reports_acc_acc_norm_n_and_chance(ray_local, tiny_model_dir):
    import lm_eval.evaluator

    from fjordtune.eval.noreval import build_task_dict, chance_from_samples, chance_level
    from fjordtune.eval.ray_lm import RayDataLM
    from fjordtune.eval.run import DocMetrics, dumps_results, leaf_tasks, per_doc_results, summarize, task_manager
    from fjordtune.eval.stats import mean_se
    from fjordtune.model.load import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    lm = RayDataLM(model_uri=str(tiny_model_dir), tokenizer=tok, dtype="float32", num_workers=1, batch_size=32)
    task_dict = build_task_dict(TASKS, DATA, num_fewshot=0, task_manager=task_manager())
    recorded = DocMetrics(leaf_tasks(task_dict))
    raw = lm_eval.evaluator.evaluate(lm=lm, task_dict=task_dict, bootstrap_iters=1000, log_samples=True)
    res = summarize(raw, leaf_tasks(task_dict), chance_fn=chance_level)
    assert set(res["tasks"]) == set(TASKS)
    # what `evaluate` uses instead of log_samples: the same per-document values and chance levels
    mine = recorded.samples()
    assert set(mine) == set(TASKS)
    for name, task in leaf_tasks(task_dict).items():
        metrics = [m for m in ("acc", "acc_norm") if m in res["tasks"][name]]
        assert per_doc_results(mine[name], metrics) == per_doc_results(raw["samples"][name], metrics), name
        assert chance_from_samples(task, mine[name]) == pytest.approx(chance_level(task), abs=1e-12), name
    for name, entry in res["tasks"].items():
        assert entry["n"] > 0 and 0 <= entry["acc"] <= 1
        assert ("acc_norm" in entry) == ("truthfulqa" not in name)
        assert 0 < entry["chance"] < 1
        # per_doc: one 0/1 per scored document, sorted by doc_id, averaging to the task's own numbers
        per_doc = entry["per_doc"]
        assert per_doc["doc_id"] == sorted(per_doc["doc_id"]) and len(set(per_doc["doc_id"])) == entry["n"]
        for metric in ("acc", "acc_norm"):
            assert (metric in per_doc) == (metric in entry)
            if metric in entry:
                assert len(per_doc[metric]) == entry["n"] and set(per_doc[metric]) <= {0, 1}
                assert sum(per_doc[metric]) / entry["n"] == pytest.approx(entry[metric], abs=1e-12), (name, metric)
                # our SE from per_doc is lm-eval's own acc_stderr
                assert mean_se(per_doc[metric]) == pytest.approx(entry[f"{metric}_stderr"], rel=1e-9), (name, metric)
    json.loads(dumps_results(res), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert json.loads(dumps_results(res)) == res


def test_chance_warning_fires_on_a_model_at_chance():
    from fjordtune.eval.run import summarize

    raw = {"results": {"t": {"acc,none": 0.24}}, "n-samples": {"t": {"effective": 400}}}
    res = summarize(raw, {"t": object()}, chance_fn=lambda task: 0.25)
    assert res["warnings"] and "below chance" in res["warnings"][0]
    raw["results"]["t"]["acc,none"] = 0.6
    assert not summarize(raw, {"t": object()}, chance_fn=lambda task: 0.25)["warnings"]


def test_a_checkpoint_with_missing_weights_is_refused_on_the_actor(ray_local, tiny_model_dir, tmp_path):
    """The story's 21% run: weights silently ignored at load. Here the Ray Data actor refuses the
    folder and the user sees a user error naming the missing keys, not a Ray traceback."""
    import shutil

    from safetensors.torch import load_file, save_file

    from fjordtune.errors import UserError
    from fjordtune.eval.ray_lm import RayDataLM
    from fjordtune.model.load import load_tokenizer

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    dropped = next(k for k in weights if "kv_b_proj" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, str(broken / "model.safetensors"),
              metadata={"format": "pt"})
    tok = load_tokenizer(str(broken))
    lm = RayDataLM(model_uri=str(broken), tokenizer=tok, dtype="float32", num_workers=1, batch_size=8)
    with pytest.raises(UserError, match="missing keys") as err:
        lm.score_pairs([("Hei", " du")])
    assert "kv_b_proj" in "\n".join(err.value.lines)


def test_batched_encoding_gives_the_tokenizers_own_ids(tiny_model_dir, monkeypatch):
    """The strings of a NorEval run are encoded in batches through the fast tokenizer's backend: the ids
    equal one `tokenizer.encode` call per string (as lm-eval's `hf` makes them), with and without special
    tokens, for a string that already starts with BOS too; a backend that disagrees is not used."""
    from fjordtune.eval.encode import PROBE, PairEncoder
    from fjordtune.model.load import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    rows = [json.loads(line) for f in sorted(DATA.rglob("*.jsonl")) for line in f.read_text().splitlines()[:40]]
    strings = sorted({str(v) for row in rows for v in row.values() if isinstance(v, str) and v.strip()})
    strings += ["", " ", "  Svar:", "Spørsmål: Kva er hovudstaden?\nSvar: ", (tok.bos_token or "") + "Hei på deg"]
    assert len(strings) > 2 * PROBE  # past the strings the fast path is checked on

    def reference(string, add_special):  # tok_encode's rule, one call per string
        kw = {} if add_special is None else {"add_special_tokens": add_special}
        if add_special is None and tok.bos_token and string.startswith(tok.bos_token):
            kw["add_special_tokens"] = False
        return tok.encode(string, **kw)

    enc = PairEncoder(tok)
    for add_special in (None, False):
        assert enc.encode(strings, add_special) == [reference(s, add_special) for s in strings]
        assert enc._fast_ok[add_special] is True  # the shortcut is what is under test

    class Wrong:  # a backend whose ids differ from the tokenizer's own call
        def encode_batch(self, part, add_special_tokens=True):
            return [type("E", (), {"ids": [0]})() for _ in part]

    monkeypatch.setattr(type(tok), "backend_tokenizer", property(lambda self: Wrong()))
    enc2 = PairEncoder(tok)
    assert enc2.encode(strings) == [reference(s, None) for s in strings]
    assert enc2._fast_ok[None] is False


def test_text_pairs_tokenize_as_lm_eval_hf_does(tiny_model_dir):
    """What an actor does with a unit's text (`PairEncoder.encode_pairs`) gives the token requests that
    lm-eval's `hf` backend builds itself (`TemplateLM.loglikelihood`, HFLM's `tok_encode`) for every request
    of real NorEval prompts, 0-shot and 2-shot, and for the edge cases: trailing spaces moved to the
    continuation, an empty context, a continuation that begins with the prefix token."""
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM
    from transformers import Mistral4ForCausalLM

    from fjordtune.eval.encode import PairEncoder
    from fjordtune.eval.noreval import build_task_dict
    from fjordtune.eval.run import task_manager
    from fjordtune.model.load import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    hf = HFLM(pretrained=Mistral4ForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32),
              tokenizer=tok, batch_size=8)
    seen = {}

    def record(requests, disable_tqdm=False, **kw):  # what hf would score, without scoring it
        seen.update({ctx_cont: (list(ctx), list(cont)) for ctx_cont, ctx, cont in requests})
        return [(0.0, False)] * len(requests)

    hf._loglikelihood_tokens = record
    for shots in (0, 2):
        task_dict = build_task_dict(TASKS, DATA, num_fewshot=shots, task_manager=task_manager(TASKS))
        lm_eval.evaluator.evaluate(lm=hf, task_dict=task_dict, bootstrap_iters=0, log_samples=False)
    bos = tok.decode([hf.prefix_token_id])
    extra = [("Svar:  ", "B"), ("", " Oslo"), ("", bos + " Oslo"), ("Hei", " du")]
    for ctx, cont in extra:
        if ctx == "":
            cont_enc = hf.tok_encode(cont, add_special_tokens=False)
            seen[(ctx, cont)] = ([hf.prefix_token_id], cont_enc) if hf.prefix_token_id != cont_enc[0] \
                else (cont_enc[:1], cont_enc[1:])
        else:
            seen[(ctx, cont)] = tuple(list(x) for x in hf._encode_pair(ctx, cont))
    pairs = list(seen)
    assert len(pairs) > 300
    got = PairEncoder(tok).encode_pairs(pairs)
    assert [(list(c), list(k)) for c, k in got] == [tuple(seen[p]) for p in pairs]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensor parallel (gloo); tests/test_gpu.py covers GPUs")
def test_a_tensor_parallel_replica_scores_like_a_single_process_one(ray_local, tiny_model_dir):
    """`tensor_parallel=2`: each Ray Data actor is rank 0 of a 2-process replica (its child the other rank,
    gloo on CPU here, one process per GPU on GPUs) holding half of every split weight. The same lm-eval
    run scores the same: accuracies identical, every request's log-likelihood within 1e-4."""
    import lm_eval.evaluator

    from fjordtune.eval.noreval import build_task_dict
    from fjordtune.eval.ray_lm import RayDataLM
    from fjordtune.eval.run import task_manager
    from fjordtune.model.load import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    names = ["noropenbookqa_nob_p1", "nortruthfulqa_mc_nno_p2"]
    runs = {}
    for ranks in (1, 2):
        lm = RayDataLM(model_uri=str(tiny_model_dir), tokenizer=tok, dtype="float32", num_workers=1, batch_size=32,
                       tensor_parallel=ranks)
        task_dict = build_task_dict(names, DATA, num_fewshot=0, task_manager=task_manager(names))
        runs[ranks] = lm_eval.evaluator.evaluate(lm=lm, task_dict=task_dict, bootstrap_iters=0, log_samples=True)
        assert set(lm.replica_ranks) == {ranks} and sum(lm.replica_ranks.values()) > 0, lm.replica_ranks
    for task in names:
        for metric in ("acc,none", "acc_norm,none"):
            assert runs[2]["results"][task].get(metric) == runs[1]["results"][task].get(metric), (task, metric)
        one = [float(r[0][0]) for s in runs[1]["samples"][task] for r in s["resps"]]
        two = [float(r[0][0]) for s in runs[2]["samples"][task] for r in s["resps"]]
        assert len(one) == len(two) > 0
        assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 1e-4


def test_replicas_started_early_load_before_lm_eval_asks_and_score_the_same(ray_local, tiny_model_dir):
    """`start_early`: Ray Data starts the scoring actors before lm-eval has built a single request (they
    wait for their units on a board actor). They are ready before lm-eval asks, and every request's
    log-likelihood is the one the usual path gives; an early start that gets no units ends cleanly."""
    import lm_eval.evaluator
    from ray._private.state import actors  # the GCS's actor table (ray.util.state needs the dashboard)

    from fjordtune.eval.noreval import build_task_dict
    from fjordtune.eval.ray_lm import RayDataLM
    from fjordtune.eval.run import task_manager
    from fjordtune.model.load import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    names = ["noropenbookqa_nob_p1", "nortruthfulqa_mc_nno_p2"]

    def scorers_alive() -> int:
        return sum("ScoreActor" in a["ActorClassName"] and a["State"] == "ALIVE" for a in actors().values())

    runs = {}
    for early in (False, True):
        lm = RayDataLM(model_uri=str(tiny_model_dir), tokenizer=tok, dtype="float32", num_workers=2, batch_size=16)
        if early:
            assert lm.start_early()
            deadline = time.monotonic() + 120
            while scorers_alive() < 2 and time.monotonic() < deadline:  # ALIVE: __init__ has returned
                time.sleep(0.5)
            assert scorers_alive() == 2
        task_dict = build_task_dict(names, DATA, num_fewshot=0, task_manager=task_manager(names))
        runs[early] = lm_eval.evaluator.evaluate(lm=lm, task_dict=task_dict, bootstrap_iters=0, log_samples=True)
        lm.close()
        if early:
            assert lm.first_ready_at < lm.asked_at
    for task in names:
        assert runs[True]["results"][task] == runs[False]["results"][task]
        got = [float(r[0][0]) for s in runs[True]["samples"][task] for r in s["resps"]]
        ref = [float(r[0][0]) for s in runs[False]["samples"][task] for r in s["resps"]]
        assert got == ref and len(got) > 0

    idle = RayDataLM(model_uri=str(tiny_model_dir), tokenizer=tok, dtype="float32", num_workers=2, batch_size=16)
    assert idle.start_early()
    t0 = time.monotonic()
    idle.close()  # the eval failed before asking: the pipeline gets no units and ends
    assert time.monotonic() - t0 < 60
    deadline = time.monotonic() + 60
    while scorers_alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert scorers_alive() == 0
