"""What the `fjordtune` command does when something goes wrong: the exit status and what lands on stderr.

Unit tier: no services. `main()` is called in-process with a command swapped for one that fails; one
test runs the real console-script path in a subprocess to see the process's own exit status. The
submit address rules are checked here too (no cluster: a dead port is all they need).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fjordtune import cli
from fjordtune.config import validate_raw
from fjordtune.devstack import free_port
from fjordtune.errors import ConfigError, InfraError, InternalError, UserError
from fjordtune.submit import address_variables_cleared, connect, resolve_address

REPO = Path(__file__).resolve().parents[1]
INTERNAL = "error: internal error (a bug in fjordtune, please report it): "


def failing_command(exc: BaseException):
    def command(args) -> int:
        raise exc

    return command


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], exc: BaseException
             ) -> tuple[int, str]:
    monkeypatch.setitem(cli.COMMANDS, "validate", failing_command(exc))
    code = cli.main(["validate", "jobs/demo.yaml"])
    return code, capsys.readouterr().err


# -- main(): exit status and stderr ------------------------------------------------------------------

def test_unexpected_exception_is_exit_4_with_traceback_and_one_line(monkeypatch, capsys) -> None:
    code, err = run_main(monkeypatch, capsys, RuntimeError("boom\nsecond line of detail"))
    assert code == 4
    assert "Traceback (most recent call last)" in err and "in command" in err
    lines = err.strip().splitlines()
    assert lines[-1] == INTERNAL + "RuntimeError: boom"
    assert sum(line.startswith("error:") for line in lines) == 1


def test_internal_error_is_exit_4_with_traceback(monkeypatch, capsys) -> None:
    code, err = run_main(monkeypatch, capsys, InternalError("an invariant broke"))
    assert code == 4
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1] == INTERNAL + "an invariant broke"


@pytest.mark.parametrize(("exc", "code"), [
    (UserError("bad input", "another problem"), 2),
    (ConfigError("jobs/x.yaml: lora.rnak: unknown key"), 2),
    (InfraError("s3://b: storage error"), 3),
])
def test_fjordtune_errors_are_one_line_each_without_traceback(monkeypatch, capsys, exc, code) -> None:
    got, err = run_main(monkeypatch, capsys, exc)
    assert got == code
    assert "Traceback" not in err
    assert err.strip().splitlines() == [f"error: {line}" for line in exc.lines]


def test_a_wrapped_fjordtune_error_keeps_its_status(monkeypatch, capsys) -> None:
    """Ray wraps errors raised in workers: the user error inside still reads as one."""
    try:
        try:
            raise UserError("data.train_files: rows.jsonl: no such file")
        except UserError as inner:
            raise RuntimeError("task failed") from inner
    except RuntimeError as wrapped:
        code, err = run_main(monkeypatch, capsys, wrapped)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == ["error: data.train_files: rows.jsonl: no such file"]


def test_keyboard_interrupt_is_130_and_system_exit_passes(monkeypatch, capsys) -> None:
    assert run_main(monkeypatch, capsys, KeyboardInterrupt())[0] == 130
    with pytest.raises(SystemExit):
        run_main(monkeypatch, capsys, SystemExit(7))


def test_process_exit_status_is_4_for_a_bug() -> None:
    code = ("import sys; from fjordtune import cli\n"
            "def bad(args): raise ZeroDivisionError('division by zero')\n"
            "cli.COMMANDS['validate'] = bad\n"
            "sys.argv = ['fjordtune', 'validate', 'jobs/demo.yaml']\n"
            "cli.entry()\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert res.returncode == 4
    assert "Traceback" in res.stderr
    assert res.stderr.strip().splitlines()[-1] == INTERNAL + "ZeroDivisionError: division by zero"


# -- submit: which cluster --------------------------------------------------------------------------

def job(**submit: str):
    raw = {"name": "unit", "model": {"path": "builtin:tiny-mistral4"}, "data": {"train_files": ["rows.jsonl"]},
           "eval": {"tasks": ["nrk_quiz_qa_nob_p0"]}, "storage": {"uri": "s3://bucket/runs"}, "submit": submit}
    return validate_raw(raw, source="jobs/x.yaml")


ENV = {"RAY_API_SERVER_ADDRESS": "http://10.0.0.1:8265", "RAY_ADDRESS": "http://10.0.0.2:8265"}


@pytest.mark.parametrize(("flag", "submit", "overrides", "environ", "url", "source"), [
    ("http://head:8265/", {"address": "http://file:8265"}, [], ENV, "http://head:8265", "--address"),
    (None, {"address": "http://file:8265"}, [], ENV, "http://file:8265", "submit.address in jobs/x.yaml"),
    (None, {"address": "http://set:8265"}, ["submit.address=http://set:8265"], ENV, "http://set:8265",
     "--set submit.address"),
    (None, {}, [], ENV, "http://10.0.0.1:8265", "RAY_API_SERVER_ADDRESS"),
    (None, {}, [], {"RAY_ADDRESS": "http://10.0.0.2:8265"}, "http://10.0.0.2:8265", "RAY_ADDRESS"),
])
def test_resolve_address_order_and_source(flag, submit, overrides, environ, url, source) -> None:
    found = resolve_address(flag, job=job(**submit), job_path="jobs/x.yaml", overrides=overrides, environ=environ)
    assert (found.url, found.source) == (url, source)


def test_resolve_address_refuses_a_gcs_address() -> None:
    with pytest.raises(UserError) as info:
        resolve_address(None, job=job(), job_path="jobs/x.yaml", overrides=[], environ={"RAY_ADDRESS": "10.0.0.2:6379"})
    (line,) = info.value.lines
    assert "no job server address" in line and "RAY_ADDRESS=10.0.0.2:6379 is a GCS address" in line
    with pytest.raises(UserError) as info:
        resolve_address("10.0.0.2:8265", job=job(), job_path="jobs/x.yaml", overrides=[], environ={})
    assert "--address 10.0.0.2:8265" in info.value.lines[0] and "http://" in info.value.lines[0]


def test_submit_address_in_job_file_must_be_a_url() -> None:
    with pytest.raises(ConfigError) as info:
        job(address="head:6379")
    (line,) = info.value.lines
    assert line.startswith("jobs/x.yaml: submit.address: the job server address is the dashboard's http:// URL")


def test_connect_talks_to_the_given_address_not_the_environments(monkeypatch) -> None:
    """Ray's client lets these variables win over its argument; here they name a dead port too, and the
    error must name the address we asked for. The variables are back afterwards."""
    env_url, asked = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", env_url)
    monkeypatch.setenv("RAY_ADDRESS", env_url)
    with pytest.raises(InfraError) as info:
        connect(asked)
    (line,) = info.value.lines
    assert line.startswith(f"submit: cannot reach the Ray job server at {asked} ") and env_url not in line
    assert "8265" in line and "port-forward" in line
    assert os.environ["RAY_ADDRESS"] == env_url and os.environ["RAY_API_SERVER_ADDRESS"] == env_url


def test_cli_submit_to_a_dead_port_is_exit_3_in_one_line(tmp_path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{free_port()}"}
    res = subprocess.run([sys.executable, "-m", "fjordtune", "submit", "jobs/demo.yaml", "--address", dead,
                          "--skip-preflight"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 3, res.stderr
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: submit: cannot reach the Ray job server at {dead} ")


def test_address_variables_cleared_restores_them(monkeypatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(KeyError), address_variables_cleared():
        assert "RAY_ADDRESS" not in os.environ and "RAY_API_SERVER_ADDRESS" not in os.environ
        os.environ["RAY_API_SERVER_ADDRESS"] = "http://set-inside:8265"  # set inside: gone afterwards
        raise KeyError("an error inside the block")
    assert os.environ["RAY_ADDRESS"] == "127.0.0.1:6379" and "RAY_API_SERVER_ADDRESS" not in os.environ
