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

Few-shot examples drawn from the scored split itself (NorCommonsenseQA: its only split is the test
set) must not include the question being asked. lm-eval's sampler drops the scored document from its
shots only when `fewshot_cfg.split == config.test_split` (`ConfigurableTask.fewshot_context`), and
`fewshot_cfg` is built from `fewshot_split` when the task's config is constructed
(`TaskConfig.__post_init__`), as is the sampler's pool (`ConfigurableTask.__init__`): so the override
has to be in the config the task is built from (`scored_split_fewshot`), never set afterwards.

Bundled hand-written samples in this layout live at `SAMPLE_DATA_DIR`.
"""

from __future__ import annotations

import difflib
import fnmatch
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
        """True when few-shot examples are drawn from the scored split itself (fjordtune then sets
        lm-eval's `fewshot_split` to it, so that lm-eval leaves the scored question out of its shots)."""
        return self.fewshot_split == self.scored_split


FAMILIES: Mapping[str, NorEvalFamily] = {
    f.name: f
    for f in (
        # Its only split, `train`, is the test set; few-shot examples are sampled from it (lm-eval's
        # registered config leaves the question being asked among them: `scored_split_fewshot` fixes it).
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

FewshotSpec = int | Mapping[str, int] | None
"""`eval.num_fewshot`: one count, None (each task's default) or {shell-style task pattern: count}."""

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


def scored_split_fewshot(task_name: str) -> dict[str, Any]:
    """lm-eval config overrides that keep a scored question out of its own few-shot examples.

    `{"fewshot_split": <scored split>}` for families whose shots come from the scored split
    (norcommonsenseqa), which turns on lm-eval's own exclusion; `{}` for the others (noropenbookqa
    takes its shots from `training_split` and is left alone). Only effective in the config a task is
    built from (see the module docstring).
    """
    family = parse_task_name(task_name).family
    return {"fewshot_split": family.scored_split} if family.fewshot_from_scored_split else {}


def local_task_config(task_name: str, data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """lm-eval overrides that make the registered task `task_name` read local JSON-lines files.

    The dict names the registered task (`task`) and replaces its dataset source:
    `dataset_path: json`, no `dataset_name`, `dataset_kwargs: {data_files: {<split>: <path>}}`,
    plus `scored_split_fewshot(task_name)`.
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
        **scored_split_fewshot(task_name),
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
    num_fewshot: FewshotSpec = None,
    task_manager: TaskManager | None = None,
    fewshot_seed: int | None = DEFAULT_FEWSHOT_SEED,
) -> TaskDict:
    """Build NorEval tasks that read local files, in the shape `lm_eval.evaluator.evaluate(task_dict=...)` takes.

    Returns `{"tasks": {name: Task}, "groups": {}, "group_map": {}}` in the order given.
    `num_fewshot` (a count, None, or a pattern mapping: `fewshot_counts`) is applied like
    `simple_evaluate` does: tasks whose YAML fixes 0-shot (nortruthfulqa_mc, nrk_quiz_qa) keep 0 and a
    warning says so; None keeps each task's default (0). Pass a `task_manager` to reuse one: building
    a TaskManager takes 7-18 s.
    """
    names = list(dict.fromkeys(task_names))
    if not names:
        raise UserError("no NorEval tasks to build")
    fewshot_counts(names, num_fewshot)  # a pattern that matches nothing fails before any loading
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


def load_registered(task_names: Iterable[str], task_manager: TaskManager) -> TaskDict:
    """`task_manager.load(task_names)` (registered tasks, groups, tags, from the hub), except that NorEval
    tasks whose shots come from the scored split, named directly or through a tag, are built with
    `scored_split_fewshot`: the same tasks, in the same order, with the scored question left out of
    its own shots."""
    from lm_eval.tasks._index import Kind

    specs: list[Any] = []
    fixed: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(task_names):
        entry = task_manager.task_index.get(name)
        # lm-eval builds a tag as its member tasks, sorted by name, with no group around them
        members = sorted(entry.tags) if entry is not None and entry.kind == Kind.TAG else [name]
        for member in members:
            specs.append(member)
            if _family_of(member) is not None and (override := scored_split_fewshot(member)):
                fixed[member] = {"task": member, **override}
    if fixed:
        built = task_manager.load({"group": _WRAPPER_GROUP, "task": list(fixed.values())})["tasks"]
        specs = [built[s] if isinstance(s, str) and s in fixed else s for s in specs]
    return task_manager.load(specs)


def _family_of(task_name: str) -> NorEvalFamily | None:
    """The NorEval family of a `<family>_<lang>_p<k>` task; None for any other name."""
    try:
        return parse_task_name(task_name).family
    except UserError:
        return None


def fewshot_counts(task_names: Iterable[str], num_fewshot: FewshotSpec) -> dict[str, int | None]:
    """The few-shot count asked for each task; None = the task's own default.

    A mapping gives each task the count of the first pattern (in mapping order) that matches its
    name; unmatched tasks get None. A pattern that matches none of `task_names` is a `UserError`
    naming `eval.num_fewshot.<pattern>` and the closest task names. Whether a task may have shots at
    all is `apply_fewshot`'s business.
    """
    names = list(task_names)
    if num_fewshot is None or isinstance(num_fewshot, int):
        return dict.fromkeys(names, num_fewshot)
    unused = [p for p in num_fewshot if not any(fnmatch.fnmatchcase(name, p) for name in names)]
    if unused:
        lines = []
        for pattern in unused:
            close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
            lines.append(f"eval.num_fewshot.{pattern}: matches none of the job's {len(names)} tasks"
                         + (f" (closest: {', '.join(close)})" if close else ""))
        raise UserError(*lines)
    return {name: next((n for p, n in num_fewshot.items() if fnmatch.fnmatchcase(name, p)), None) for name in names}


def apply_fewshot(tasks: dict[str, Task], num_fewshot: FewshotSpec, *, seed: int | None = DEFAULT_FEWSHOT_SEED) -> None:
    """Set few-shot counts the way `simple_evaluate` does, and seed the few-shot sampler so the examples
    are the same on every run.

    `num_fewshot` as in `fewshot_counts`. A task whose config fixes 0-shot (NorEval's nortruthfulqa_mc
    and nrk_quiz_qa) stays at 0, as `simple_evaluate` keeps it: one warning line lists those that were
    asked for shots. A task left at its default with no default gets 0.
    """
    counts = fewshot_counts(tasks, num_fewshot)
    kept_at_zero = []
    for name, task in tasks.items():
        task.set_fewshot_seed(seed=seed)
        count, default = counts[name], task.get_config("num_fewshot")
        if count is None:
            if default is None:
                task.set_config(key="num_fewshot", value=0)
        elif default == 0:
            if count > 0:
                kept_at_zero.append(name)
        else:
            task.set_config(key="num_fewshot", value=count)
        if task.get_config("num_fewshot") and _leaks_scored_doc(name, task):
            log.warning("%s: few-shot examples come from the scored split and may include the question being "
                        "asked: the task was not built with fewshot_split set (load it by task name)", name)
    if kept_at_zero:
        log.warning("0-shot kept for %d task(s) whose config fixes num_fewshot: 0, as lm-eval does: %s",
                    len(kept_at_zero), compact_names(kept_at_zero))


def _leaks_scored_doc(name: str, task: Task) -> bool:
    """A NorEval task whose shots come from the scored split, built without lm-eval's exclusion."""
    family = _family_of(name)
    return family is not None and family.fewshot_from_scored_split and not excludes_scored_doc(task)


def excludes_scored_doc(task: Task) -> bool:
    """Whether lm-eval leaves the scored document out of its own shots: its condition, verbatim
    (`ConfigurableTask.fewshot_context`: the few-shot split equals the test split)."""
    return task.fewshot_cfg.split == task.config.test_split


def fewshot_source(task: Task) -> str | None:
    """The split lm-eval's sampler draws shots from: `fewshot_split`, else (`Task.fewshot_docs`) the
    training, validation or test split, in that order; `"config samples"` for examples listed in the config."""
    if task.fewshot_cfg.split is not None:
        return task.fewshot_cfg.split
    if task.config.fewshot_config is not None and task.fewshot_cfg.samples is not None:
        return "config samples"
    return task.config.training_split or task.config.validation_split or task.config.test_split


def compact_names(names: Iterable[str]) -> str:
    """`nrk_quiz_qa_nob_p0, nrk_quiz_qa_nob_p1, other` -> `nrk_quiz_qa_nob_p{0,1}, other`."""
    folded: dict[str, list[int]] = {}  # "<family>_<lang>" -> prompts, or any other name -> []
    for name in names:
        m = _TASK_RE.match(name)
        folded.setdefault(f"{m['family']}_{m['lang']}" if m else name, []).extend([int(m["prompt"])] if m else [])
    return ", ".join(key if not prompts else f"{key}_p{prompts[0]}" if len(prompts) == 1
                     else f"{key}_p{{{','.join(map(str, prompts))}}}" for key, prompts in folded.items())


def chance_from_samples(task: Task, samples: list[dict[str, Any]]) -> float:
    """`chance_level` read off lm-eval's logged samples instead of the documents: a multiple-choice
    document sends one request per choice (twice that with `acc_mutual_info`), so its `arguments` count
    its choices. The same number without rendering every document's choices again (5 s over the full
    NorEval sets). Without samples, `chance_level`."""
    rows = [s for s in samples if s.get("filter", "none") == "none"]
    if not rows or task.get_config("output_type") != "multiple_choice":
        return chance_level(task)
    per_choice = 2 if "acc_mutual_info" in (rows[0].get("metrics") or ()) else 1
    return sum(per_choice / len(r["arguments"]) for r in rows) / len(rows)


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
