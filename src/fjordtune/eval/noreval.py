"""NorEval's four multiple-choice families in lm-eval 0.4.13, read from local JSON-lines files.

lm-eval registers each family as `<family>_<lang>_p<k>` (`lang` is `nob` or `nno`, `k` picks one of
five prompt templates) and reads the data from the Hugging Face hub. This module points those
registered tasks at local files laid out like the hub datasets:

    <data_dir>/<hf_dataset_id>/<config>/<split>.jsonl   e.g. <data_dir>/ltg/nrk_quiz_qa/nb/test.jsonl

How lm-eval 0.4.13 takes the override (checked against its source, `lm_eval/tasks/manager.py` and
`_factory.py`): a top-level dict passed to `TaskManager.load` (or the deprecated `get_task_dict`) is
built as a *standalone inline* task, without the registered YAML, even when its `task` key names a
registered task. Only a dict inside a group's `task:` list is merged (shallowly) over the registered
config. So `build_task_dict` loads one throwaway group whose members are the override dicts from
`local_task_config`, then returns the leaf tasks without the group.

Bundled hand-written samples in this layout live at `SAMPLE_DATA_DIR`.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fjordtune.errors import UserError

if TYPE_CHECKING:
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks.manager import TaskDict

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class NorEvalFamily:
    """One NorEval multiple-choice dataset as lm-eval 0.4.13 evaluates it."""

    name: str
    """Task-name prefix, e.g. `nrk_quiz_qa` (tasks are `<name>_<lang>_p<k>`)."""
    dataset_id: str
    """Hugging Face dataset id, also the first folders of the local layout, e.g. `ltg/nrk_quiz_qa`."""
    scored_split: str
    """The split lm-eval scores (its `test_split`, else `validation_split`)."""
    fewshot_split: str | None
    """The split few-shot examples come from; None when the task YAML fixes `num_fewshot: 0`."""
    metrics: tuple[str, ...]
    """Metrics the task reports."""

    @property
    def splits(self) -> tuple[str, ...]:
        """Every split lm-eval reads when it builds the task (scored split first)."""
        if self.fewshot_split is None or self.fewshot_split == self.scored_split:
            return (self.scored_split,)
        return (self.scored_split, self.fewshot_split)

    @property
    def fewshot_from_scored_split(self) -> bool:
        """True when few-shot examples are drawn from the scored split itself, question included."""
        return self.fewshot_split == self.scored_split


FAMILIES: Mapping[str, NorEvalFamily] = {
    f.name: f
    for f in (
        # Its only split, `train`, is the test set; few-shot examples are sampled from it without
        # excluding the question being asked.
        NorEvalFamily(
            name="norcommonsenseqa",
            dataset_id="ltg/norcommonsenseqa",
            scored_split="train",
            fewshot_split="train",
            metrics=("acc", "acc_norm"),
        ),
        # process_docs drops rows whose `fact` is empty, in both splits.
        NorEvalFamily(
            name="noropenbookqa",
            dataset_id="ltg/noropenbookqa",
            scored_split="test",
            fewshot_split="train",
            metrics=("acc", "acc_norm"),
        ),
        # The gold answer is index 0 of `mc1_targets.choices`.
        NorEvalFamily(
            name="nortruthfulqa_mc",
            dataset_id="ltg/nortruthfulqa_mc",
            scored_split="validation",
            fewshot_split=None,
            metrics=("acc",),
        ),
        NorEvalFamily(
            name="nrk_quiz_qa",
            dataset_id="ltg/nrk_quiz_qa",
            scored_split="test",
            fewshot_split=None,
            metrics=("acc", "acc_norm"),
        ),
    )
}
"""The four families by task-name prefix."""

LANGUAGES: Mapping[str, str] = {"nob": "nb", "nno": "nn"}
"""Task-name language code -> dataset config: Bokmål (`nob`/`nb`) and Nynorsk (`nno`/`nn`)."""

NUM_PROMPTS = 5
"""Prompt templates per family and language: `_p0` .. `_p4`."""

SAMPLE_DATA_DIR = Path(__file__).resolve().parent.parent / "samples" / "noreval"
"""Hand-written NorEval-format samples shipped with fjordtune (not the real test sets)."""

DEFAULT_FEWSHOT_SEED = 1234
"""Seed of the few-shot sampler; lm-eval's `simple_evaluate` uses the same default."""

_TASK_RE = re.compile(r"^(?P<family>[a-z_]+)_(?P<lang>nob|nno)_p(?P<prompt>\d+)$")
_WRAPPER_GROUP = "fjordtune_local_noreval"


class NorEvalDataMissing(UserError, FileNotFoundError):
    """A split file that a NorEval task needs is not in the local data folder."""


@dataclass(frozen=True)
class TaskRef:
    """A parsed task name `<family>_<lang>_p<prompt>`."""

    family: NorEvalFamily
    lang: str
    prompt: int

    @property
    def name(self) -> str:
        return f"{self.family.name}_{self.lang}_p{self.prompt}"

    @property
    def config(self) -> str:
        """The dataset config (`nb` or `nn`)."""
        return LANGUAGES[self.lang]


def parse_task_name(task_name: str) -> TaskRef:
    """Split `<family>_<lang>_p<k>` into its parts; raise `UserError` for anything else."""
    m = _TASK_RE.match(task_name)
    if not m or m["family"] not in FAMILIES or int(m["prompt"]) >= NUM_PROMPTS:
        raise UserError(
            f"{task_name!r} is not a NorEval multiple-choice task: expected <family>_<lang>_p<k> with family in "
            f"{{{', '.join(FAMILIES)}}}, lang in {{{', '.join(LANGUAGES)}}} and k in 0..{NUM_PROMPTS - 1}, "
            "e.g. nrk_quiz_qa_nob_p0"
        )
    return TaskRef(FAMILIES[m["family"]], m["lang"], int(m["prompt"]))


def task_names(
    families: Iterable[str] | None = None,
    langs: Iterable[str] | None = None,
    prompts: Iterable[int] = range(NUM_PROMPTS),
) -> list[str]:
    """Task names `<family>_<lang>_p<k>` for every combination, family-major.

    `families` and `langs` default to all of them (`FAMILIES`, `LANGUAGES`).
    """
    fams = list(FAMILIES) if families is None else list(families)
    lang_list = list(LANGUAGES) if langs is None else list(langs)
    prompt_list = list(prompts)
    bad = [f"family {f!r}" for f in fams if f not in FAMILIES]
    bad += [f"lang {lang!r}" for lang in lang_list if lang not in LANGUAGES]
    bad += [f"prompt {p!r}" for p in prompt_list if not (isinstance(p, int) and 0 <= p < NUM_PROMPTS)]
    if bad:
        raise UserError(
            f"unknown NorEval {', '.join(bad)}; families: {', '.join(FAMILIES)}; langs: {', '.join(LANGUAGES)}; "
            f"prompts: 0..{NUM_PROMPTS - 1}"
        )
    return [f"{f}_{lang}_p{p}" for f in fams for lang in lang_list for p in prompt_list]


def split_files(task_name: str, data_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """{split: path} of the local files a task reads (whether or not they exist)."""
    ref = parse_task_name(task_name)
    folder = Path(data_dir) / ref.family.dataset_id / ref.config
    return {split: folder / f"{split}.jsonl" for split in ref.family.splits}


def local_task_config(task_name: str, data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """lm-eval overrides that make the registered task `task_name` read local JSON-lines files.

    The dict names the registered task (`task`) and replaces its dataset source:
    `dataset_path: json`, no `dataset_name`, `dataset_kwargs: {data_files: {<split>: <path>}}`.
    lm-eval 0.4.13 merges it over the registered config only as a member of a group's task list
    (see the module docstring); `build_task_dict` does that.

    Raises `NorEvalDataMissing` (a `FileNotFoundError`) naming every missing split file.
    """
    ref = parse_task_name(task_name)
    files = split_files(task_name, data_dir)
    missing = [f"{split} split at {path}" for split, path in files.items() if not path.is_file()]
    if missing:
        raise NorEvalDataMissing(
            f"NorEval task {task_name} needs the {'; '.join(missing)}: no such file. Expected the layout "
            f"<data_dir>/<hf_dataset_id>/<config>/<split>.jsonl, here {Path(data_dir) / ref.family.dataset_id}"
            f"/{ref.config}/{{{','.join(files)}}}.jsonl"
        )
    return {
        "task": task_name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path.resolve()) for split, path in files.items()}},
    }


def _check_registered(task_name: str, task_manager: TaskManager) -> None:
    """Fail early if lm-eval does not register the task the way this module expects."""
    entry = task_manager.task_index.get(task_name)
    if entry is None or entry.cfg is None:
        raise UserError(f"lm-eval does not register the task {task_name!r}; fjordtune expects lm-eval 0.4.13's NorEval")
    cfg = entry.cfg
    family = parse_task_name(task_name).family
    scored = cfg.get("test_split") or cfg.get("validation_split")
    fewshot = cfg.get("fewshot_split") or cfg.get("training_split") or cfg.get("validation_split") or scored
    if cfg.get("num_fewshot") == 0:
        fewshot = None
    if cfg.get("dataset_path") != family.dataset_id or (scored, fewshot) != (family.scored_split, family.fewshot_split):
        raise UserError(
            f"lm-eval's {task_name} reads {cfg.get('dataset_path')} split {scored!r} (few-shot from {fewshot!r}), but "
            f"fjordtune expects {family.dataset_id} split {family.scored_split!r} (few-shot from "
            f"{family.fewshot_split!r}); this module matches lm-eval 0.4.13"
        )


def build_task_dict(
    task_names: Iterable[str],
    data_dir: str | os.PathLike[str],
    *,
    num_fewshot: int | None = None,
    task_manager: TaskManager | None = None,
    fewshot_seed: int | None = DEFAULT_FEWSHOT_SEED,
) -> TaskDict:
    """Build NorEval tasks that read local files, in the shape `lm_eval.evaluator.evaluate(task_dict=...)` takes.

    Returns `{"tasks": {name: Task}, "groups": {}, "group_map": {}}` in the order given.
    `num_fewshot` is applied like `simple_evaluate` does: tasks whose YAML fixes 0-shot
    (nortruthfulqa_mc, nrk_quiz_qa) keep 0 and a warning says so; None keeps each task's default (0).
    Pass a `task_manager` to reuse one: building a TaskManager takes 7-18 s.
    """
    names = list(dict.fromkeys(task_names))
    if not names:
        raise UserError("no NorEval tasks to build")
    overrides = [local_task_config(name, data_dir) for name in names]  # all file errors before any loading
    if task_manager is None:
        from lm_eval.tasks import TaskManager

        task_manager = TaskManager()
    for name in names:
        _check_registered(name, task_manager)

    loaded = task_manager.load({"group": _WRAPPER_GROUP, "task": overrides})
    tasks = {name: loaded["tasks"][name] for name in names}

    apply_fewshot(tasks, num_fewshot, seed=fewshot_seed)
    return {"tasks": tasks, "groups": {}, "group_map": {}}


def apply_fewshot(tasks: dict[str, Task], num_fewshot: int | None, *, seed: int | None = DEFAULT_FEWSHOT_SEED) -> None:
    """Set few-shot counts the way `simple_evaluate` does, keeping NorEval's fixed 0-shot tasks at 0,
    and seed the few-shot sampler so the examples are the same on every run."""
    for name, task in tasks.items():
        task.set_fewshot_seed(seed=seed)
        try:
            family = parse_task_name(name).family
        except UserError:  # not a NorEval task: apply the count as given
            if num_fewshot is not None:
                task.set_config(key="num_fewshot", value=num_fewshot)
            continue
        if num_fewshot is None:
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
        elif task.get_config("num_fewshot") == 0 and family.fewshot_split is None:
            if num_fewshot > 0:
                log.warning("%s: NorEval fixes this task to 0-shot; ignoring num_fewshot=%d", name, num_fewshot)
        else:
            task.set_config(key="num_fewshot", value=num_fewshot)
            if num_fewshot > 0 and family.fewshot_from_scored_split:
                log.warning(
                    "%s: few-shot examples come from the scored split %r itself and may include the question "
                    "being asked (lm-eval does not exclude it)",
                    name,
                    family.scored_split,
                )

def chance_level(task: Task, *, limit: int | None = None) -> float:
    """Expected accuracy of guessing uniformly at random: the mean of 1/num_choices over the task's docs.

    `limit` averages over the first `limit` docs only, as lm-eval's `limit` scores them. Tasks that
    are not multiple choice have no chance level: NaN.
    """
    if task.get_config("output_type") != "multiple_choice":
        return math.nan
    docs = task.eval_docs
    count = len(docs) if limit is None else min(limit, len(docs))
    if count == 0:
        raise UserError(f"{task.config.task}: no documents to compute a chance level over")
    return sum(1.0 / len(task.doc_to_choice(docs[i])) for i in range(count)) / count
