"""Evaluation that survives its actors: unit results stored in real S3 as they finish, a SIGKILLed
scoring actor restarted without redoing finished units, a crash that repeats ending in bounded time
with the actor's death cause, and a second evaluation of the same model scoring nothing.

Real Ray (local), real lm-eval, real SeaweedFS; the kills are real SIGKILLs by PID."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

import fjordtune

DATA = Path(fjordtune.__file__).resolve().parent / "samples" / "noreval"
BUCKET = "fjordtune-eval-resume"


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """Local Ray started with the S3 settings in its environment: the scoring actors store results."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env.items():
            mp.setenv(key, value)
        mp.setenv(*SESSION.split("=", 1))
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
        yield
        ray.shutdown()


@pytest.fixture
def bucket(s3_env):
    from fjordtune.storage import Store

    Store().ensure_bucket(f"s3://{BUCKET}")
    return s3_env


SESSION = f"FJORDTUNE_TEST_RAY={uuid.uuid4().hex}"
"""Put into this module's Ray cluster's environment: the kills below touch only its own actors, never
those of another test run on the same machine."""


def score_actors() -> list[int]:
    """PIDs of this module's live Ray Data scoring actors (Ray names their processes after the map's class)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
                if not (cmd.startswith("ray::") and "ScoreActor" in cmd):
                    continue
                if SESSION.encode() in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _tasks(num_fewshot=0):
    from fjordtune.eval.noreval import build_task_dict, task_names
    from fjordtune.eval.run import task_manager

    return build_task_dict(task_names(), DATA, num_fewshot=num_fewshot, task_manager=task_manager())


def _lm(model_dir, results, **kw):
    from fjordtune.eval.ray_lm import RayDataLM
    from fjordtune.model.load import load_tokenizer
    from fjordtune.storage import Store

    return RayDataLM(model_uri=str(model_dir), tokenizer=load_tokenizer(str(model_dir)), dtype="float32",
                     num_workers=2, batch_size=kw.pop("batch_size", 2), storage=Store().settings(),
                     results=results, **kw)


def _scores(lm):
    import lm_eval.evaluator

    raw = lm_eval.evaluator.evaluate(lm=lm, task_dict=_tasks(), bootstrap_iters=0, log_samples=True)
    accs = {t: (r.get("acc,none"), r.get("acc_norm,none")) for t, r in raw["results"].items()}
    lls = {t: [float(x[0][0]) for s in samples for x in [s["resps"][i] for i in range(len(s["resps"]))]]
           for t, samples in raw["samples"].items()}
    return accs, lls


def _result_store(prefix, model_dir):
    from fjordtune.eval.encode import tokenizer_fingerprint
    from fjordtune.eval.units import ResultStore
    from fjordtune.model.load import load_tokenizer
    from fjordtune.storage import Store

    store = Store()
    return ResultStore.for_model(store, f"s3://{BUCKET}/{prefix}", model_uri=str(model_dir), adapter_uri=None,
                                 dtype="float32", tokenizer=tokenizer_fingerprint(load_tokenizer(str(model_dir))))


def test_a_sigkilled_actor_costs_only_its_unfinished_unit(ray_local, bucket, tiny_model_dir):
    from fjordtune.storage import Store

    reference_accs, reference_lls = _scores(_lm(tiny_model_dir, None))

    results = _result_store("killed", tiny_model_dir)
    lm = _lm(tiny_model_dir, results)
    store = Store()
    seen: dict[str, object] = {}

    def killer() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            stored = store.list_objects(f"{results.uri}/units") if store.get_object(f"{results.uri}/model.json") else {}
            pids = score_actors()
            if len(stored) >= 20 and pids:
                seen["before"] = stored  # finished when the actor died: never to be written again
                os.kill(pids[0], signal.SIGKILL)
                seen["killed"] = pids[0]
                return
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    accs, lls = _scores(lm)
    t.join(timeout=5)
    assert "killed" in seen, "the run ended before an actor could be killed: make it longer"
    assert accs == reference_accs
    assert max(abs(a - b) for task in lls for a, b in zip(lls[task], reference_lls[task], strict=True)) < 1e-4

    # every unit scored exactly once over the whole run, the killed actor's finished units included: a
    # unit it had stored but not yet returned is read back by the retry, not scored again
    units = set(lm.scored_units) | set(lm.reused_units)
    assert len(lm.scored_units) + len(lm.reused_units) == len(units), "a unit was scored twice"
    stored_after = store.list_objects(f"{results.uri}/units")
    assert {f"{u}.json" for u in units} == set(stored_after)
    assert len(lm.reused_units) <= 4  # only what the killed actor had in flight
    assert set(seen["before"]) <= set(stored_after)
    assert lm.num_scored + lm.num_reused == sum(len(s) for s in lls.values())
    # the units stored before the kill were not written again (same modification time)
    assert all(stored_after[k][1] == v[1] for k, v in seen["before"].items())


def test_a_second_evaluation_of_the_same_model_scores_nothing(ray_local, bucket, tiny_model_dir):
    results = _result_store("again", tiny_model_dir)
    first = _lm(tiny_model_dir, results, batch_size=16)
    assert first.start_early()  # cold: the replicas load while lm-eval builds its requests
    accs1, lls1 = _scores(first)
    assert first.num_scored > 0 and first.num_reused == 0
    assert first.first_ready_at is not None
    second = _lm(tiny_model_dir, _result_store("again", tiny_model_dir), batch_size=16)
    assert not second.start_early()  # stored units may cover it: plan first, start only what is missing
    accs2, lls2 = _scores(second)
    assert (second.num_scored, second.num_reused) == (0, first.num_scored)
    assert second.scored_units == []
    assert accs1 == accs2 and lls1 == lls2  # bit for bit: the stored floats round-trip


def test_a_crash_on_every_attempt_ends_in_bounded_time_with_the_cause(ray_local, bucket, tiny_model_dir):
    from fjordtune.errors import InfraError

    stop = threading.Event()
    killed: list[int] = []

    def killer() -> None:
        while not stop.is_set():
            for pid in score_actors():
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    lm = _lm(tiny_model_dir, _result_store("crash", tiny_model_dir), max_restarts=1)
    started = time.monotonic()
    try:
        with pytest.raises(InfraError) as err:
            _scores(lm)
    finally:
        stop.set()
        t.join(timeout=5)
    elapsed = time.monotonic() - started
    assert elapsed < 120, elapsed
    text = str(err.value)
    assert "died 2 times" in text and "eval.max_restarts" in text, text
    assert len(set(killed)) >= 2
    assert "\n" not in text.strip()
