"""Accuracy on lm-evaluation-harness tasks, base model and quantized model side by side.

``lm_eval`` is optional (``pip install "quantport[lm-eval]"``) and imported only when tasks run. Each
model is wrapped as lm_eval's ``HFLM`` around the already-loaded model and the one tokenizer both share,
then scored by ``lm_eval.simple_evaluate``: its seeds, few-shot handling and metrics are those of the
``lm_eval`` command, so the numbers compare with published ones.

Tasks are names lm_eval knows (``hellaswag``, ``arc_easy``), or local task YAML files and directories,
as lm_eval's ``TaskManager`` loads them: a YAML file is loaded by its path (the task or group it defines),
a directory is indexed (``include_path``) and stands for every task defined in its YAML files. When every
entry is local, lm_eval's built-in task index (some 15,000 YAML files, tens of seconds to scan) is not
built.

Recovery is ``quantized / base`` for each metric, whatever its direction (``higher_is_better`` says it).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import QuantportError

__all__ = [
    "LM_EVAL_INSTALL",
    "LmEvalMissingError",
    "ResolvedTasks",
    "TaskEvalError",
    "TaskOptions",
    "TaskScore",
    "TaskSelection",
    "UnknownTaskError",
    "compare_results",
    "format_scores",
    "parse_tasks",
    "require_lm_eval",
    "resolve_tasks",
    "score_tasks",
]

logger = logging.getLogger(__name__)

LM_EVAL_INSTALL = 'pip install "quantport[lm-eval]"'
"""The command that installs the lm-evaluation-harness version quantport is tested with."""

BOOTSTRAP_ITERS = 1000
"""Resamples for the standard error of metrics without a closed form (a mean's is exact)."""

_YAML_SUFFIXES = (".yaml", ".yml")
_STDERR = "_stderr"


class TaskEvalError(QuantportError):
    """Task evaluation cannot run as asked."""


class LmEvalMissingError(TaskEvalError):
    """lm-evaluation-harness is not installed."""


class UnknownTaskError(TaskEvalError):
    """A task name lm_eval does not know, or a task path that does not define one."""


@dataclass(frozen=True, slots=True)
class TaskSelection:
    """What ``--tasks`` asks for, split by kind.

    Attributes:
        names: task, group or tag names looked up in lm_eval's index.
        files: local task YAML files.
        directories: local directories of task YAML files.
    """

    names: tuple[str, ...] = ()
    files: tuple[Path, ...] = ()
    directories: tuple[Path, ...] = ()

    @property
    def needs_builtin_tasks(self) -> bool:
        """Whether a name has to be looked up in lm_eval's built-in tasks."""
        return bool(self.names)


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """How each task is run.

    Attributes:
        limit: documents per task (``None``: all of them).
        num_fewshot: few-shot examples per prompt (``None``: the task's default).
        batch_size: requests per forward pass.
    """

    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 4


@dataclass(frozen=True, slots=True)
class ResolvedTasks:
    """Task specs (names, or paths of task YAML files) checked against an lm_eval ``TaskManager`` that loads
    them all."""

    manager: Any
    specs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TaskScore:
    """One metric of one task for both models.

    Attributes:
        task: the task (or group) name.
        metric: the metric name (``acc``, ``acc_norm``, ``exact_match``, ...).
        filter: lm_eval's filter name (``none`` when the task has no filter).
        base: the base model's value.
        quantized: the quantized model's value.
        base_stderr: standard error of ``base`` (``None`` when lm_eval gives none).
        quantized_stderr: standard error of ``quantized``.
        higher_is_better: the metric's direction as the task declares it (``None``: not declared).
    """

    task: str
    metric: str
    filter: str
    base: float
    quantized: float
    base_stderr: float | None
    quantized_stderr: float | None
    higher_is_better: bool | None

    @property
    def recovery(self) -> float | None:
        """``quantized / base``; ``None`` when ``base`` is 0."""
        return self.quantized / self.base if self.base else None

    def to_dict(self) -> dict[str, Any]:
        """The fields and ``recovery``, as ``--json`` prints them."""
        return {**asdict(self), "recovery": self.recovery}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskScore:
        """The inverse of :meth:`to_dict` (``recovery`` is derived, so it is not read)."""
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def parse_tasks(text: str) -> TaskSelection:
    """Split ``--tasks``: comma-separated task names, task YAML files or task directories."""
    names: list[str] = []
    files: list[Path] = []
    directories: list[Path] = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        path = Path(entry).expanduser()
        if path.is_dir():
            directories.append(path.resolve())
        elif path.is_file():
            if path.suffix not in _YAML_SUFFIXES:
                raise UnknownTaskError(f"task file {entry} is not a .yaml file; give an lm_eval task YAML")
            files.append(path.resolve())
        elif path.suffix in _YAML_SUFFIXES or "/" in entry:
            raise UnknownTaskError(f"task path {entry} does not exist")
        else:
            names.append(entry)
    if not (names or files or directories):
        raise UnknownTaskError("--tasks names no task; give task names or task YAML paths, comma-separated")
    return TaskSelection(tuple(names), tuple(files), tuple(directories))


def require_lm_eval() -> None:
    """Raise :class:`LmEvalMissingError` unless lm-evaluation-harness can be imported."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise LmEvalMissingError(
            f"--tasks needs lm-evaluation-harness, which is not installed ({exc}); run: {LM_EVAL_INSTALL}"
        ) from exc


@contextmanager
def _logger_level(name: str, level: int) -> Iterator[None]:
    target = logging.getLogger(name)
    before = target.level
    target.setLevel(max(level, target.getEffectiveLevel()))
    try:
        yield
    finally:
        target.setLevel(before)


def _tasks_under(manager: Any, directory: Path) -> list[str]:
    """The tasks (not groups or tags) whose YAML lies under ``directory``."""
    tasks = set(manager.all_subtasks)
    return [
        name
        for name, entry in manager.task_index.items()
        if name in tasks and entry.yaml_path is not None and Path(entry.yaml_path).resolve().is_relative_to(directory)
    ]


def _file_spec(file: Path) -> str:
    """``file`` as lm_eval loads a task path (its ``include:`` resolved next to it), once checked to define one."""
    from lm_eval.tasks._index import TaskIndex  # what TaskManager.load does with a path

    problem = f"{file} is not an lm_eval task YAML (it needs a 'task:' or 'group:' name)"
    try:
        entry = TaskIndex.entry_from_path(file)
    except Exception as exc:  # noqa: BLE001 - YAML errors, unknown config shapes
        raise UnknownTaskError(f"{problem}: {' '.join(str(exc).split())}") from exc
    if entry is None:
        raise UnknownTaskError(problem)
    return str(file)


def _unknown(name: str, known: list[str]) -> UnknownTaskError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.75)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `lm_eval ls tasks` lists the known ones"
    return UnknownTaskError(f"lm_eval has no task named {name!r}{hint}")


def resolve_tasks(selection: TaskSelection) -> ResolvedTasks:
    """Index the tasks ``selection`` asks for and check every one exists (no data is loaded yet)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    with _logger_level("lm_eval", logging.WARNING):
        manager = TaskManager(
            include_path=[str(p) for p in selection.directories] or None,
            include_defaults=selection.needs_builtin_tasks,
        )
    specs: list[str] = []
    for name in selection.names:
        if name not in manager.task_index:
            raise _unknown(name, manager.all_tasks)
        specs.append(name)
    specs += [_file_spec(file) for file in selection.files]
    for directory in selection.directories:
        defined = _tasks_under(manager, directory)
        if not defined:
            raise UnknownTaskError(f"{directory} holds no lm_eval task YAML")
        specs += defined
    return ResolvedTasks(manager, tuple(dict.fromkeys(specs)))


def score_tasks(model: Any, tokenizer: Any, tasks: ResolvedTasks, options: TaskOptions) -> dict[str, Any]:
    """Run ``tasks`` on an instantiated causal LM; returns lm_eval's results dict (``results``,
    ``higher_is_better``, ``n-samples``, ...)."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    # HFLM warns that a model object ignores its loading options: quantport loaded it already
    with _logger_level("lm_eval.models.huggingface", logging.ERROR):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size)
    with _logger_level("lm_eval", logging.WARNING):
        results = simple_evaluate(
            lm,
            tasks=list(tasks.specs),
            task_manager=tasks.manager,
            limit=options.limit,
            num_fewshot=options.num_fewshot,
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=False,
        )
    if not results or not results.get("results"):
        raise TaskEvalError(f"lm_eval returned no results for {', '.join(tasks.specs)}")
    return results


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def compare_results(base: Mapping[str, Any], quantized: Mapping[str, Any]) -> list[TaskScore]:
    """Pair every numeric metric of every task in two lm_eval results dicts (base first, in its order).

    Metric keys are lm_eval's ``"metric,filter"``; their standard errors are ``"metric_stderr,filter"``.
    """
    scores = []
    directions = base.get("higher_is_better", {})
    for task, metrics in base["results"].items():
        other = quantized["results"].get(task, {})
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            base_value, quant_value = _number(value), _number(other.get(key))
            if not filter_name or metric.endswith(_STDERR) or base_value is None or quant_value is None:
                continue
            stderr_key = f"{metric}{_STDERR},{filter_name}"
            scores.append(
                TaskScore(
                    task=task,
                    metric=metric,
                    filter=filter_name,
                    base=base_value,
                    quantized=quant_value,
                    base_stderr=_number(metrics.get(stderr_key)),
                    quantized_stderr=_number(other.get(stderr_key)),
                    higher_is_better=directions.get(task, {}).get(metric),
                )
            )
    return scores


def _value(value: float, stderr: float | None) -> str:
    return f"{value:.4f}" + (f" ±{stderr:.4f}" if stderr is not None else "")


def format_scores(scores: list[TaskScore]) -> str:
    """A plain-text table: task, metric, base, quantized, recovery."""
    header = ("task", "metric", "base", "quantized", "recovery")
    rows = [
        (
            s.task,
            s.metric if s.filter == "none" else f"{s.metric} [{s.filter}]",
            _value(s.base, s.base_stderr),
            _value(s.quantized, s.quantized_stderr),
            f"{s.recovery:.4f}" if s.recovery is not None else "-",
        )
        for s in scores
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
