"""Job files: loading, validation messages, `--set` overrides, and the `fjordtune` CLI around them.

Unit tier: no services. The CLI is run as a real subprocess (`python -m fjordtune`) because its
contract is the exit status and what lands on stderr.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fjordtune.config import JobSpec, apply_overrides, dump_job, load_job, validate_raw
from fjordtune.config.load import _model_of, parse_override, repeated_keys
from fjordtune.errors import ConfigError, InfraError, PreflightRefused, UserError

REPO = Path(__file__).resolve().parents[1]
JOB_FILES = sorted((REPO / "jobs").glob("*.yaml"))
SUBCOMMANDS = ["validate", "preflight", "train", "eval", "report", "run", "submit"]


def minimal_raw() -> dict[str, Any]:
    """The smallest valid job: only the required keys."""
    return {
        "name": "unit",
        "model": {"path": "builtin:tiny-mistral4"},
        "data": {"train_files": ["rows.jsonl"]},
        "eval": {"tasks": ["nrk_quiz_qa_nob_p0"]},
        "storage": {"uri": "s3://bucket/runs"},
    }


def write_job(tmp_path: Path, raw: Any, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def errors_of(raw: Any, *, source: str = "job.yaml", overrides: tuple[str, ...] = ()) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        validate_raw(raw, source=source, overrides=overrides)
    return info.value.lines


def all_key_paths(model: type = JobSpec, prefix: str = "") -> list[str]:
    paths = []
    for name, field in model.model_fields.items():
        sub = _model_of(field.annotation)
        paths.extend(all_key_paths(sub, f"{prefix}{name}.") if sub is not None else [f"{prefix}{name}"])
    return paths


# -- shipped job files ------------------------------------------------------------------------------

def test_jobs_folder_is_not_empty() -> None:
    assert JOB_FILES, "no jobs/*.yaml found: the parametrized check below would test nothing"


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_every_shipped_job_validates(path: Path) -> None:
    job = load_job(path)
    assert isinstance(job, JobSpec)
    assert job.name
    # every job file starts with a comment giving its launch command (docs/STYLE.md)
    assert path.read_text().lstrip().startswith("#"), f"{path.name} should start with its launch command"


def test_minimal_job_gets_documented_defaults() -> None:
    job = validate_raw(minimal_raw(), source="mem")
    assert job.lora.rank == 32 and job.model.dtype == "bfloat16"
    assert "o_proj" in job.lora.target_modules and job.lora.target_parameters
    assert job.run_uri == "s3://bucket/runs/unit"


# -- one line per problem, naming file and key path -------------------------------------------------

def test_misspelled_key_exact_message(tmp_path: Path) -> None:
    raw = minimal_raw()
    raw["lora"] = {"rnak": 8}
    path = write_job(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert info.value.lines == (f"{path}: lora.rnak: unknown key (did you mean lora.rank?)",)
    assert str(info.value) == f"{path}: lora.rnak: unknown key (did you mean lora.rank?)"


@pytest.mark.parametrize(
    ("section", "key", "expected"),
    [
        ("model", "rank", "lora.rank"),
        ("lora", "lr", "train.lr"),
        ("data", "epochs", "train.epochs"),
        ("train", "use_gpu", "resources.use_gpu"),
        # the exact key exists in another section: that must beat a loose match in this one
        ("train", "max_seq_len", "data.max_seq_len"),
        ("train", "shuffle_seed", "data.shuffle_seed"),
        (None, "rank", "lora.rank"),  # a section key written at the top level
    ],
)
def test_key_in_wrong_section_suggests_right_one(section: str | None, key: str, expected: str) -> None:
    raw = minimal_raw()
    if section is None:
        raw[key] = 8
        where = key
    else:
        raw.setdefault(section, {})[key] = 8
        where = f"{section}.{key}"
    assert errors_of(raw) == (f"job.yaml: {where}: unknown key (did you mean {expected}?)",)


def test_misspelled_section_suggests_section() -> None:
    raw = minimal_raw()
    raw["lorra"] = {"rank": 8}
    assert errors_of(raw) == ("job.yaml: lorra: unknown key (did you mean lora?)",)


def test_unknown_key_without_near_match_has_no_hint() -> None:
    raw = minimal_raw()
    raw["lora"] = {"zzzqqq": 1}
    assert errors_of(raw) == ("job.yaml: lora.zzzqqq: unknown key",)


@pytest.mark.parametrize(
    ("section", "key", "value", "fragment"),
    [
        ("model", "dtype", "fp8", "'float32' or 'bfloat16'"),
        ("lora", "rank", 0, "greater than 0"),
        ("lora", "rank", "big", "valid integer"),
        ("lora", "dropout", 1.0, "less than 1"),
        ("train", "micro_batch_size", 1.5, "valid integer"),
        ("telemetry", "nvml", "maybe", "valid boolean"),
        ("storage", "uri", "gs://bucket/x", "use s3:// or a local path"),
        ("data", "train_files", "rows.jsonl", "valid list"),
    ],
)
def test_wrong_type_or_value_is_one_line(section: str, key: str, value: Any, fragment: str) -> None:
    raw = minimal_raw()
    raw.setdefault(section, {})[key] = value
    lines = errors_of(raw, source="jobs/x.yaml")
    assert len(lines) == 1, lines
    line = lines[0]
    assert "\n" not in line
    assert line.startswith(f"jobs/x.yaml: {section}.{key}: "), line
    assert fragment in line
    assert f"(got {value!r})" in line


def test_training_data_is_train_files_or_sources_never_neither() -> None:
    raw = minimal_raw()
    raw["data"] = {"train_files": []}
    (line,) = errors_of(raw, source="jobs/x.yaml")
    assert line.startswith("jobs/x.yaml: data: give train_files (the simple form) or sources (a mixture)"), line
    raw["data"] = {"train_files": ["a.jsonl"], "sources": [{"path": "b.jsonl"}]}
    assert len(errors_of(raw, source="jobs/x.yaml")) == 1


def test_a_wrong_key_in_a_source_names_its_index_and_the_nearest_key() -> None:
    raw = minimal_raw()
    raw["data"] = {"sources": [{"path": "a.jsonl"}, {"path": "b.jsonl", "wieght": 0.5}, {"hf": "x", "path": "y"}]}
    lines = errors_of(raw, source="jobs/x.yaml")
    assert "jobs/x.yaml: data.sources[1].wieght: unknown key (did you mean data.sources[1].weight?)" in lines, lines
    assert any(line.startswith("jobs/x.yaml: data.sources[2]: give exactly one of path") for line in lines), lines


def test_section_of_wrong_type_names_the_section() -> None:
    raw = minimal_raw()
    raw["resources"] = 5
    (line,) = errors_of(raw)
    assert line.startswith("job.yaml: resources: ") and "(got 5)" in line


def test_missing_required_keys_are_named() -> None:
    raw = minimal_raw()
    del raw["name"]
    del raw["storage"]["uri"]
    assert set(errors_of(raw)) == {
        "job.yaml: name: required key is missing",
        "job.yaml: storage.uri: required key is missing",
    }


def test_lora_with_no_targets_is_refused() -> None:
    raw = minimal_raw()
    raw["lora"] = {"target_modules": [], "target_parameters": []}
    (line,) = errors_of(raw)
    assert line.startswith("job.yaml: lora: ") and "nothing would train" in line


def test_several_errors_reported_at_once(tmp_path: Path) -> None:
    raw = minimal_raw()
    raw["lora"] = {"rnak": 8, "alpha": -1}
    raw["model"]["dtype"] = "fp8"
    raw["train"] = {"epochs": 0}
    path = write_job(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_job(path)
    lines = info.value.lines
    assert len(lines) == 4, lines
    assert all(line.startswith(f"{path}: ") for line in lines)
    keys = {line[len(f"{path}: ") :].split(":")[0] for line in lines}
    assert keys == {"lora.rnak", "lora.alpha", "model.dtype", "train.epochs"}
    assert str(info.value).splitlines() == list(lines)


# -- --set overrides ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("lora.target_modules=[o_proj, q_a_proj]", ("lora", "target_modules"), ["o_proj", "q_a_proj"]),
        ("lora.target_parameters=[]", ("lora", "target_parameters"), []),
        ("train.epochs=3", ("train", "epochs"), 3),
        ("train.lr=0.0002", ("train", "lr"), 0.0002),
        ("train.activation_checkpointing=false", ("train", "activation_checkpointing"), False),
        ("resources.use_gpu=true", ("resources", "use_gpu"), True),
        ("train.max_steps=null", ("train", "max_steps"), None),
        ("model.path=builtin:tiny-mistral4", ("model", "path"), "builtin:tiny-mistral4"),
        ("submit.env_vars={A: '1'}", ("submit", "env_vars"), {"A": "1"}),
        ("name=with=equals", ("name",), "with=equals"),
        ("model.tokenizer=", ("model", "tokenizer"), ""),
    ],
)
def test_parse_override_reads_values_as_yaml(text: str, path: tuple[str, ...], value: Any) -> None:
    got_path, got = parse_override(text)
    assert got_path == path
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text", ["train.lr", "=5", "lora.rank=[unclosed"])
def test_parse_override_rejects_malformed(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_override(text)
    assert len(info.value.lines) == 1 and repr(text) in info.value.lines[0]


def test_apply_overrides_copies_and_creates_sections() -> None:
    raw = minimal_raw()
    before = json.dumps(raw, sort_keys=True)
    out = apply_overrides(raw, ["lora.rank=4", "train.epochs=1", "data.train_files=[a.jsonl, b.jsonl]"])
    assert json.dumps(raw, sort_keys=True) == before, "apply_overrides must not change its input"
    assert out["lora"] == {"rank": 4} and out["train"] == {"epochs": 1}
    assert out["data"]["train_files"] == ["a.jsonl", "b.jsonl"]
    out["data"]["train_files"].append("c")
    assert raw["data"]["train_files"] == ["rows.jsonl"]


def test_load_job_applies_overrides(tmp_path: Path) -> None:
    path = write_job(tmp_path, minimal_raw())
    job = load_job(path, [
        "lora.rank=4", "lora.target_modules=[o_proj]", "lora.target_parameters=[]",
        "train.activation_checkpointing=false", "train.lr=1e-4",  # the CLI help's own example
    ])
    assert job.lora.rank == 4
    assert job.lora.target_modules == ["o_proj"] and job.lora.target_parameters == []
    assert job.train.activation_checkpointing is False
    assert job.train.lr == pytest.approx(1e-4) and isinstance(job.train.lr, float)


def test_errors_from_set_are_marked(tmp_path: Path) -> None:
    raw = minimal_raw()
    raw["model"]["dtype"] = "fp8"  # an error in the file itself: not marked
    path = write_job(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_job(path, ["lora.rank=0", "lora.rnak=3"])
    lines = set(info.value.lines)
    assert f"{path}: lora.rank (from --set): Input should be greater than 0 (got 0)" in lines
    assert f"{path}: lora.rnak (from --set): unknown key (did you mean lora.rank?)" in lines
    dtype_line = next(line for line in lines if "model.dtype" in line)
    assert "(from --set)" not in dtype_line
    assert len(lines) == 3


# -- unreadable files --------------------------------------------------------------------------------

def test_invalid_yaml_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodel: {path: [unclosed\n  dtype: float32\n")
    with pytest.raises(ConfigError) as info:
        load_job(path)
    (line,) = info.value.lines
    assert "\n" not in line and line.startswith(f"{path}: not valid YAML")


def test_validate_exits_2_on_a_repeated_key_with_file_line_and_key(tmp_path: Path, capsys) -> None:
    """The command a user runs: a top-level and a nested repeat, each on its own `error:` line, exit 2."""
    from fjordtune import cli

    path = tmp_path / "twice.yaml"
    path.write_text("name: a\n"              # 1
                    "train:\n"               # 2
                    "  epochs: 2\n"          # 3
                    "  lr: 5.0e-5\n"         # 4
                    "  epochs: 3\n"          # 5
                    "name: b\n")             # 6
    assert cli.main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {path}:5: train.epochs: repeated key (first at line 3); keep one",
        f"error: {path}:6: name: repeated key (first at line 1); keep one",
    ]


@pytest.mark.parametrize(("yaml_text", "expected"), [
    ("eval:\n  chat_template_args: {lang: no}\n", "eval.chat_template_args.lang: `no` reads as False: write true/false"),
    ("data:\n  packing: yes\n", "data.packing: `yes` reads as True"),
    ("train:\n  seed: 0123\n", "train.seed: `0123` reads as octal (83)"),
    ("submit:\n  env_vars: {TIMEOUT: 1:30}\n", "submit.env_vars.TIMEOUT: `1:30` reads as a base-60 number (90)"),
    ("base: &b {lr: 1.0e-4}\ntrain:\n  <<: *b\n  lr: 2.0e-4\n", "train: `<<` merge key"),
    ("on: 1\n", "on: the key `on` reads as a boolean"),
])
def test_yaml_1_1_surprises_are_refused_with_line_and_key(tmp_path: Path, yaml_text: str, expected: str) -> None:
    """PyYAML reads YAML 1.1: `no` is false (the Norway problem), `0123` is octal, `1:30` is 90, and a key
    beside a `<<` merge silently wins. Each is an error naming the line; quoting is the fix."""
    path = tmp_path / "job.yaml"
    path.write_text("name: x\n" + yaml_text)
    with pytest.raises(ConfigError) as info:
        load_job(path)
    (line,) = info.value.lines
    assert line.startswith(f"{path}:") and expected in line, line
    quoted = tmp_path / "quoted.yaml"  # the same, quoted or written out, passes the YAML check
    quoted.write_text("name: x\neval:\n  chat_template_args: {lang: 'no', t: '1:30', n: '0123', ok: true, f: 0.5}\n")
    with pytest.raises(ConfigError) as info:
        load_job(quoted)
    assert not any("reads as" in e for e in info.value.lines), info.value.lines  # only schema errors remain


def test_an_override_with_a_yaml_1_1_surprise_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"--set eval.tasks: `no` reads as False"):
        parse_override("eval.tasks=[nrk_quiz_qa_nob, no]")
    assert parse_override("eval.tasks=[nrk_quiz_qa_nob, 'no']")[1] == ["nrk_quiz_qa_nob", "no"]


def test_a_repeated_key_at_any_depth_is_refused_with_file_line_and_key(tmp_path: Path) -> None:
    """PyYAML keeps the last of a repeated key without a word (`lr` twice: the first is silently lost)."""
    path = tmp_path / "twice.yaml"
    path.write_text(
        "name: x\n"                                   # 1
        "train:\n"                                    # 2
        "  lr: 1.0e-4\n"                              # 3
        "  epochs: 2\n"                               # 4
        "  lr: 5.0e-5\n"                              # 5
        "eval:\n"                                     # 6
        "  tasks: [noropenbookqa_nob_p0]\n"           # 7
        "  chat_template_args: {a: 1, a: 2}\n"        # 8
        "name: y\n"                                   # 9
        "data:\n"                                     # 10
        "  sources:\n"                                # 11
        "    - {path: a.jsonl, path: b.jsonl}\n"      # 12
    )
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert list(info.value.lines) == [
        f"{path}:5: train.lr: repeated key (first at line 3); keep one",
        f"{path}:8: eval.chat_template_args.a: repeated key (first at line 8); keep one",
        f"{path}:9: name: repeated key (first at line 1); keep one",
        f"{path}:12: data.sources.[0].path: repeated key (first at line 12); keep one",
    ]
    # the same keys once each, in separate mappings, and through an alias, are fine
    ok = tmp_path / "once.yaml"
    ok.write_text("name: x\ntrain: &t {lr: 1.0e-4}\neval: {tasks: [noropenbookqa_nob_p0]}\n"
                  "lora: {rank: 8}\nx-copy: *t\n")
    assert repeated_keys(yaml.compose(ok.read_text(), Loader=yaml.SafeLoader)) == []


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_top_level_is_one_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_job(path)
    (line,) = info.value.lines
    assert line.startswith(f"{path}: ") and "mapping" in line and "\n" not in line


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert info.value.lines == (f"{path}: no such job file",)


# -- what crosses Ray process boundaries -------------------------------------------------------------

@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_dump_job_round_trip(path: Path) -> None:
    job = load_job(path, ["lora.rank=4"])
    plain = dump_job(job)
    # what a Ray worker receives: plain JSON types only, serialised and read back
    received = json.loads(json.dumps(plain))
    again = validate_raw(received, source="ray-worker")
    assert again == job
    assert dump_job(again) == plain
    assert pickle.loads(pickle.dumps(job)) == job


def test_config_error_pickles() -> None:
    with pytest.raises(ConfigError) as info:
        validate_raw({"name": "x", "lora": {"rnak": 1}}, source="job.yaml")
    err = info.value
    assert len(err.lines) > 1
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ConfigError and isinstance(back, UserError)
    assert back.lines == err.lines and str(back) == str(err) and back.exit_code == 2


@pytest.mark.parametrize(("cls", "code"), [(UserError, 2), (PreflightRefused, 2), (InfraError, 3)])
def test_error_taxonomy_pickles(cls: type, code: int) -> None:
    back = pickle.loads(pickle.dumps(cls("first problem", "second problem")))
    assert type(back) is cls and back.lines == ("first problem", "second problem") and back.exit_code == code


# -- the CLI as a subprocess -------------------------------------------------------------------------

def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "fjordtune", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_validate_shipped_jobs() -> None:
    res = run_cli("validate", *(str(p.relative_to(REPO)) for p in JOB_FILES))
    assert res.returncode == 0, res.stderr
    for p in JOB_FILES:
        assert f"ok: {p.relative_to(REPO)}" in res.stdout


def test_cli_validate_misspelled_key(tmp_path: Path) -> None:
    text = (REPO / "jobs" / "demo.yaml").read_text()
    assert "\n  rank:" in text
    bad = tmp_path / "demo.yaml"
    bad.write_text(text.replace("\n  rank:", "\n  rnak:", 1))
    res = run_cli("validate", str(bad))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert f"error: {bad}: lora.rnak: unknown key (did you mean lora.rank?)" in res.stderr.splitlines()
    assert "ok:" not in res.stdout


def test_cli_validate_reports_all_files(tmp_path: Path) -> None:
    good = REPO / "jobs" / "demo.yaml"
    bad = write_job(tmp_path, {**minimal_raw(), "lora": {"rank": 0}})
    missing = tmp_path / "missing.yaml"
    res = run_cli("validate", str(good), str(bad), str(missing))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"ok: {good}" in res.stdout
    errs = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert any(line.startswith(f"error: {bad}: lora.rank: ") for line in errs)
    assert f"error: {missing}: no such job file" in errs


def test_cli_set_errors_are_marked() -> None:
    res = run_cli("validate", "jobs/demo.yaml", "--set", "lora.rank=0")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "error: jobs/demo.yaml: lora.rank (from --set): Input should be greater than 0 (got 0)" in res.stderr


def test_cli_explain_lists_every_key() -> None:
    res = run_cli("validate", "--explain")
    assert res.returncode == 0, res.stderr
    assert "lora.target_parameters" in res.stdout
    missing = [p for p in all_key_paths() if p not in res.stdout]
    assert not missing, f"--explain does not document {missing}"


@pytest.mark.parametrize("command", [None, *SUBCOMMANDS])
def test_cli_help(command: str | None) -> None:
    res = run_cli(*([command] if command else []), "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: fjordtune") and "Traceback" not in res.stderr
    if command is None:
        for sub in SUBCOMMANDS:
            assert sub in res.stdout


# -- credentials never in a job file ------------------------------------------------------------------

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
NOT_HERE = "credentials do not belong in a job file"


def test_secret_env_var_exact_message(tmp_path: Path) -> None:
    raw = minimal_raw()
    raw["submit"] = {"env_vars": {"AWS_SECRET_ACCESS_KEY": SECRET, "NCCL_DEBUG": "INFO"}}
    path = write_job(tmp_path, raw, name="x.yaml")
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert info.value.lines == (
        f"{path}: submit.env_vars.AWS_SECRET_ACCESS_KEY: credentials do not belong in a job file (they would travel "
        "in Ray's runtime_env and show in the dashboard); set AWS_SECRET_ACCESS_KEY in the cluster's environment, "
        "an AWS profile or an instance role",
    )
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("name", [
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "HF_TOKEN", "GITHUB_TOKEN", "MY_SECRET",
    "DB_PASSWORD", "OPENAI_API_KEY", "WANDB_API_KEY", "GOOGLE_APPLICATION_CREDENTIALS", "SECRETKEY", "secretKey",
])
def test_credential_env_vars_are_refused(name: str) -> None:
    raw = minimal_raw()
    raw["submit"] = {"env_vars": {name: SECRET}}
    (line,) = errors_of(raw, source="jobs/x.yaml")
    assert line.startswith(f"jobs/x.yaml: submit.env_vars.{name}: {NOT_HERE} ") and f"set {name} in " in line
    assert SECRET not in line


@pytest.mark.parametrize("name", ["TOKENIZERS_PARALLELISM", "NCCL_DEBUG", "OMP_NUM_THREADS", "HF_HUB_OFFLINE", "PWD"])
def test_ordinary_env_vars_pass(name: str) -> None:
    raw = minimal_raw()
    raw["submit"] = {"env_vars": {name: "1"}}
    assert validate_raw(raw, source="mem").submit.env_vars == {name: "1"}


@pytest.mark.parametrize(("key", "value"), [
    ("storage.endpoint_url", f"http://AKIAEXAMPLE:{SECRET}@minio.internal:9000"),
    ("storage.uri", f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs"),
    ("submit.address", f"https://admin:{SECRET}@head.example:8265"),
    ("model.path", f"https://user:{SECRET}@models.example/mistral"),
    ("data.train_files.0", f"https://user:{SECRET}@data.example/rows.jsonl"),
    ("submit.pip.0", f"git+https://oauth2:{SECRET}@gitlab.example/x/y.git"),
    ("submit.env_vars.DATABASE_URL", f"postgres://app:{SECRET}@db:5432/app"),
])
def test_user_password_in_a_url_is_refused(key: str, value: str) -> None:
    raw = minimal_raw()
    section, rest = key.split(".", 1)
    field, _, sub = rest.partition(".")
    node = raw.setdefault(section, {})
    node[field] = [value] if sub == "0" else {sub: value} if sub else value
    (line,) = errors_of(raw, source="jobs/x.yaml")
    key = key.replace(".0", "[0]")  # list items are named as in data.sources[0].path
    assert line.startswith(f"jobs/x.yaml: {key}: {NOT_HERE} ") and "user:password@" in line, line
    assert SECRET not in line and "AKIAEXAMPLE" not in line


@pytest.mark.parametrize("value", [
    "http://head.example:8265", "https://head.example/ray", "git+https://github.com/x/y.git", "ssh://git@github.com/x",
])
def test_urls_without_a_password_pass(value: str) -> None:
    raw = minimal_raw()
    raw["submit"] = {"pip": [value]}
    assert validate_raw(raw, source="mem").submit.pip == [value]


@pytest.mark.parametrize("path", [
    ("storage", "secret_key"), ("storage", "aws_secret_access_key"), ("storage", "access_key"),
    ("storage", "secretAccessKey"), ("model", "token"), ("model", "hf_token"), ("aws_secret_access_key",),
    ("storage", "credentials"), ("submit", "password"),
])
def test_credential_keys_say_so_instead_of_suggesting_a_key(path: tuple[str, ...]) -> None:
    raw = minimal_raw()
    node: Any = raw
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = {"id": "AKIAEXAMPLE", "key": SECRET} if path[-1] == "credentials" else SECRET
    (line,) = errors_of(raw, source="jobs/x.yaml")
    key = ".".join(path)
    assert line.startswith(f"jobs/x.yaml: {key}: {NOT_HERE} "), line
    assert "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in line and "instance role" in line
    assert "unknown key" not in line and "did you mean" not in line
    assert SECRET not in line


def test_credential_found_below_an_unknown_key_and_other_errors_still_reported() -> None:
    raw = minimal_raw()
    raw["storage"]["s3"] = {"secret_access_key": SECRET}
    raw["lora"] = {"rnak": 8}
    lines = errors_of(raw)
    assert set(lines) == {
        f"job.yaml: storage.s3.secret_access_key: {NOT_HERE} {lines[0].split(NOT_HERE + ' ', 1)[1]}",
        "job.yaml: storage.s3: unknown key",
        "job.yaml: lora.rnak: unknown key (did you mean lora.rank?)",
    }
    assert all(SECRET not in line for line in lines)


@pytest.mark.parametrize(("section", "key", "value"), [
    ("submit", "env_vars", {"AWS_SECRET_ACCESS_KEY": 123456789012}),  # not a string: pydantic would echo it
    ("storage", "uri", f"gs://user:{SECRET}@bucket/x"),  # a wrong scheme: the uri check would echo it
    ("submit", "address", f"ftp://user:{SECRET}@head:8265"),
])
def test_the_value_never_shows_in_any_line(section: str, key: str, value: Any) -> None:
    raw = minimal_raw()
    raw.setdefault(section, {})[key] = value
    lines = errors_of(raw)
    assert len(lines) == 1 and NOT_HERE in lines[0]
    assert SECRET not in lines[0] and "123456789012" not in lines[0]


def test_credentials_from_set_are_marked_and_not_echoed(tmp_path: Path) -> None:
    path = write_job(tmp_path, minimal_raw())
    with pytest.raises(ConfigError) as info:
        load_job(path, [f"submit.env_vars={{AWS_SESSION_TOKEN: {SECRET}}}", f"storage.secret_key={SECRET}"])
    heads = sorted(line.split(NOT_HERE)[0] for line in info.value.lines)
    assert heads == [f"{path}: storage.secret_key (from --set): ",
                     f"{path}: submit.env_vars.AWS_SESSION_TOKEN (from --set): "]
    assert SECRET not in str(info.value)


def test_malformed_set_with_a_secret_does_not_echo_it() -> None:
    with pytest.raises(ConfigError) as info:
        parse_override(f"submit.env_vars={{AWS_SECRET_ACCESS_KEY: [{SECRET}")
    (line,) = info.value.lines
    assert line.startswith("--set submit.env_vars=...: value is not valid YAML (") and SECRET not in line


def test_cli_refuses_a_secret_from_set_without_echoing_it() -> None:
    res = run_cli("validate", "jobs/demo.yaml", "--set", f"submit.env_vars={{AWS_SECRET_ACCESS_KEY: {SECRET}}}")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.splitlines() == [
        "error: jobs/demo.yaml: submit.env_vars.AWS_SECRET_ACCESS_KEY (from --set): credentials do not belong in a "
        "job file (they would travel in Ray's runtime_env and show in the dashboard); set AWS_SECRET_ACCESS_KEY in "
        "the cluster's environment, an AWS profile or an instance role"]
    assert SECRET not in res.stdout + res.stderr
