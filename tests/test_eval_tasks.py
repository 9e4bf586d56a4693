"""``quantport eval --tasks``: lm-evaluation-harness tasks on the base and the quantized model.

The task is local (``tests/data/eval_tasks/facts.jsonl``, eight three-way multiple-choice questions, its
YAML written per test), so nothing is downloaded. The harness's accuracy is checked against the same
accuracy computed here with the models' logits directly.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import quantport
from quantport.errors import QuantportError
from quantport.eval_commands import add_commands
from quantport.eval_tasks import (
    LmEvalMissingError,
    TaskScore,
    TaskSelection,
    UnknownTaskError,
    compare_results,
    format_scores,
    parse_tasks,
    require_lm_eval,
)
from quantport.evaluate import EvalDataError, ModelMismatchError, check_same_model, eval_batches
from quantport.loading import resolve_model_dir

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm_eval not installed")

DATA = Path(__file__).parent / "data" / "eval_tasks" / "facts.jsonl"
TASK = "quantport_facts"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory) -> Path:
    """The bundled tiny Llama quantized with the fp8 recipe (static FP8 inputs, FP8 KV cache)."""
    out = tmp_path_factory.mktemp("quant") / "fp8"
    directory = resolve_model_dir("bundled:tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto").eval()
    batches = eval_batches(AutoTokenizer.from_pretrained(directory), samples=4, seq_len=64, batch_size=2)
    quantport.quantize(model, "fp8", batches, kv_cache="fp8", progress=False)
    quantport.export(model, out, progress=False)
    return out


def _task_yaml(directory: Path) -> Path:
    """An lm_eval multiple-choice task over the local JSONL (datasets' cache inside ``directory``)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "facts.yaml"
    path.write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {json.dumps(str(DATA))}\n"
        f"  cache_dir: {json.dumps(str(directory / 'hf_cache'))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return path


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="quantport")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


@torch.inference_mode()
def _accuracy(model: torch.nn.Module, tokenizer, rows: list[dict]) -> float:
    """Fraction of rows whose answer has the largest summed log-probability after the question.

    The continuation is " " + choice (lm_eval's default target delimiter), its tokens those that
    tokenizing question + continuation adds to tokenizing the question alone.
    """
    correct = 0
    for row in rows:
        context = tokenizer.encode(row["question"])
        scores = []
        for choice in row["choices"]:
            tokens = context + tokenizer.encode(row["question"] + " " + choice)[len(context) :]
            logits = model(input_ids=torch.tensor([tokens[:-1]])).logits[0].float()
            log_probs = torch.log_softmax(logits, dim=-1)
            positions = range(len(context) - 1, len(tokens) - 1)
            scores.append(sum(log_probs[p, tokens[p + 1]].item() for p in positions))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == row["answer"])
    return correct / len(rows)


def _table_rows(text: str) -> dict[str, list[str]]:
    """The table's data rows by metric: [task, metric, base, ±stderr, quantized, ±stderr, recovery]."""
    rows = [line.split() for line in text.splitlines() if line.startswith(TASK)]
    return {row[1]: row for row in rows}


@needs_lm_eval
def test_tasks_table_against_a_direct_computation(tmp_path, fp8_checkpoint, capsys):
    yaml = _task_yaml(tmp_path / "tasks")
    code = _cli("eval", "bundled:tiny-llama", str(fp8_checkpoint), "--tasks", str(yaml), "--limit", "6")
    assert code == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert text.splitlines()[1].split() == ["task", "metric", "base", "quantized", "recovery"]
    rows = _table_rows(text)
    assert set(rows) == {"acc", "acc_norm"}

    docs = [json.loads(line) for line in DATA.read_text().splitlines()][:6]  # --limit 6 of 8
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("bundled:tiny-llama"))
    base = AutoModelForCausalLM.from_pretrained(resolve_model_dir("bundled:tiny-llama"), dtype="auto").eval()
    quant = quantport.load(fp8_checkpoint, simulate_activations=True)
    expected_base, expected_quant = _accuracy(base, tokenizer, docs), _accuracy(quant, tokenizer, docs)
    for metric in ("acc", "acc_norm"):
        _, _, base_acc, base_err, quant_acc, quant_err, recovery = rows[metric]
        assert 0.0 <= float(base_acc) <= 1.0 and 0.0 <= float(quant_acc) <= 1.0
        assert float(recovery) == pytest.approx(float(quant_acc) / float(base_acc), abs=1e-4)
        # six documents: accuracy is k/6 and its standard error sqrt(acc (1 - acc) / 5)
        acc = float(base_acc)
        assert acc * 6 == pytest.approx(round(acc * 6), abs=1e-3)
        assert float(base_err.lstrip("±")) == pytest.approx((acc * (1 - acc) / 5) ** 0.5, abs=1e-4)
    assert float(rows["acc"][2]) == pytest.approx(expected_base, abs=1e-4)
    assert float(rows["acc"][4]) == pytest.approx(expected_quant, abs=1e-4)


@needs_lm_eval
def test_tasks_json_from_a_task_directory(tmp_path, fp8_checkpoint, capsys):
    directory = _task_yaml(tmp_path / "tasks").parent
    args = ("eval", "bundled:tiny-llama", str(fp8_checkpoint), "--tasks", str(directory), "--json", "--quiet")
    assert _cli(*args, "--weights-only", "--batch-size", "2") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tasks"] == [TASK] and summary["samples"] == {TASK: 8} and summary["limit"] is None
    assert summary["simulate_activations"] is False
    assert [(s["task"], s["metric"], s["filter"]) for s in summary["scores"]] == [
        (TASK, "acc", "none"),
        (TASK, "acc_norm", "none"),
    ]
    for score in summary["scores"]:
        assert 0.0 <= score["base"] <= 1.0 and 0.0 <= score["quantized"] <= 1.0
        assert score["base"] * 8 == pytest.approx(round(score["base"] * 8))
        assert score["recovery"] == pytest.approx(score["quantized"] / score["base"])
        assert score["higher_is_better"] is True


@needs_lm_eval
def test_unknown_task_fails_before_loading_a_model(tmp_path, fp8_checkpoint, capsys, monkeypatch):
    """A name lm_eval does not know: one line, with the close names. lm_eval's own index (tens of
    seconds to build) is replaced by one holding the local task only."""
    import lm_eval.tasks

    local = _task_yaml(tmp_path / "tasks").parent

    class LocalTasksOnly(lm_eval.tasks.TaskManager):
        def __init__(self, include_path=None, include_defaults=True, **kwargs):
            super().__init__(include_path=[str(local)], include_defaults=False, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTasksOnly)
    monkeypatch.setattr("quantport.loading.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert _cli("eval", "bundled:tiny-llama", str(fp8_checkpoint), "--tasks", "quantport_fact") == 2
    err = capsys.readouterr().err
    assert err == "error: lm_eval has no task named 'quantport_fact'; did you mean quantport_facts?\n"


@needs_lm_eval
@pytest.mark.parametrize(
    ("tasks", "match"),
    [
        ("missing/facts.yaml", "task path missing/facts.yaml does not exist"),
        (" , ", "--tasks names no task"),
        ("{notes}", r"notes.txt is not a \.yaml file"),
        ("{empty}", r"empty.yaml is not an lm_eval task YAML \(it needs a 'task:' or 'group:' name\)"),
    ],
)
def test_bad_task_paths(tmp_path, fp8_checkpoint, capsys, tasks, match):
    notes, empty = tmp_path / "notes.txt", tmp_path / "empty.yaml"
    notes.write_text("not a task")
    empty.write_text("dataset_path: json\n")
    spec = tasks.format(notes=notes, empty=empty)
    assert _cli("eval", "bundled:tiny-llama", str(fp8_checkpoint), "--tasks", spec) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(match, err)


def test_lm_eval_missing_names_the_pip_command(fp8_checkpoint, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    assert _cli("eval", "bundled:tiny-llama", str(fp8_checkpoint), "--tasks", "hellaswag") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tasks needs lm-evaluation-harness") and 'pip install "quantport[lm-eval]"' in err
    with pytest.raises(LmEvalMissingError):
        require_lm_eval()


def test_base_and_quant_mismatch(tmp_path, fp8_checkpoint, capsys):
    other = tmp_path / "other"
    shutil.copytree(fp8_checkpoint, other)
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"], config["num_hidden_layers"] = 8192, 3
    (other / "config.json").write_text(json.dumps(config))
    assert _cli("eval", "bundled:tiny-llama", str(other), "--tasks", "hellaswag") == 2
    assert capsys.readouterr().err == (
        "error: BASE and QUANT are different models (vocab_size 4096 vs 8192; num_hidden_layers 2 vs 3); "
        "give the model QUANT was quantized from as BASE\n"
    )
    assert _cli("eval", "bundled:tiny-llama", str(other), "--samples", "1", "--seq-len", "8") == 2  # perplexity too
    assert "different models" in capsys.readouterr().err


def test_task_options_need_tasks(fp8_checkpoint, capsys):
    assert _cli("eval", "bundled:tiny-llama", str(fp8_checkpoint), "--limit", "5") == 2
    assert capsys.readouterr().err == "error: --limit and --num-fewshot apply to --tasks only\n"
    with pytest.raises(SystemExit):
        _cli("eval", "a", "b", "--tasks", "x", "--num-fewshot", "-1")
    assert "expected an integer >= 0" in capsys.readouterr().err


def test_parse_tasks(tmp_path):
    yaml = _task_yaml(tmp_path)
    selection = parse_tasks(f"hellaswag, {yaml},{tmp_path},arc_easy,")
    assert selection == TaskSelection(("hellaswag", "arc_easy"), (yaml.resolve(),), (tmp_path.resolve(),))
    assert selection.needs_builtin_tasks and not parse_tasks(str(tmp_path)).needs_builtin_tasks
    with pytest.raises(UnknownTaskError, match="names no task"):
        parse_tasks(",")


def _results(task_metrics: dict[str, dict], directions: dict[str, dict] | None = None) -> dict:
    return {"results": task_metrics, "higher_is_better": directions or {}}


def test_compare_results_pairs_numeric_metrics():
    base = _results(
        {
            "mmlu": {"alias": "mmlu", "acc,none": 0.5, "acc_stderr,none": 0.01, "sample_len": 10},
            "gsm8k": {
                "exact_match,strict-match": 0.25,
                "exact_match_stderr,strict-match": "N/A",
                "exact_match,flexible-extract": 0.0,
            },
        },
        {"mmlu": {"acc": True}, "gsm8k": {"exact_match": True}},
    )
    quant = _results(
        {
            "mmlu": {"alias": "mmlu", "acc,none": 0.45, "acc_stderr,none": 0.02, "sample_len": 10},
            "gsm8k": {"exact_match,strict-match": 0.2, "exact_match,flexible-extract": 0.1},
        }
    )
    scores = compare_results(base, quant)
    assert scores == [
        TaskScore("mmlu", "acc", "none", 0.5, 0.45, 0.01, 0.02, True),
        TaskScore("gsm8k", "exact_match", "strict-match", 0.25, 0.2, None, None, True),
        TaskScore("gsm8k", "exact_match", "flexible-extract", 0.0, 0.1, None, None, True),
    ]
    assert scores[0].recovery == pytest.approx(0.9) and scores[2].recovery is None
    assert [TaskScore.from_dict(s.to_dict()) for s in scores] == scores
    lines = format_scores(scores).splitlines()
    assert lines[0].split() == ["task", "metric", "base", "quantized", "recovery"]
    assert lines[2].split() == ["mmlu", "acc", "0.5000", "±0.0100", "0.4500", "±0.0200", "0.9000"]
    assert lines[3].split() == ["gsm8k", "exact_match", "[strict-match]", "0.2500", "0.2000", "0.8000"]
    assert lines[4].split()[-1] == "-"


def test_eval_errors_are_quantport_errors():
    assert issubclass(EvalDataError, QuantportError) and issubclass(ModelMismatchError, EvalDataError)
    check_same_model({"model_type": "llama", "vocab_size": 8}, {"model_type": "llama", "hidden_size": 4})
    with pytest.raises(ModelMismatchError, match="model_type 'llama' vs 'qwen3'"):
        check_same_model({"model_type": "llama"}, {"model_type": "qwen3"})
