"""``quantport quantize --algorithm``: typed options from flags, checked before torch is imported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from quantport.algorithm_options import (
    AwqOptions,
    ExpertGptqPolicy,
    GptqOptions,
    MaxOptions,
    MseOptions,
    SmoothQuantOptions,
)
from quantport.cli import _parser, main
from quantport.errors import InvalidArgumentError
from quantport.quantize_args import algorithm_from_args

HEAD = ["quantize", "m", "o", "--recipe", "w4a16"]


def _options(*flags):
    return algorithm_from_args(_parser(quantize_only=True).parse_args([*HEAD, *flags]))


def test_flags_give_typed_options():
    assert _options() == MaxOptions()
    assert _options("--algorithm", "gptq") == GptqOptions()
    assert _options("--algorithm", "gptq", "--gptq-act-order", "--gptq-damp", "0.05") == GptqOptions(
        damp=0.05, act_order=True
    )
    assert _options("--algorithm", "gptq", "--gptq-block-size", "256", "--gptq-static-groups") == GptqOptions(
        block_size=256, static_groups=True
    )
    assert _options("--algorithm", "mse", "--mse-min-ratio", "0.7", "--mse-steps", "6") == MseOptions(0.7, 6)
    expert_flags = ("--gptq-expert-policy", "rtn", "--gptq-expert-min-tokens", "64", "--gptq-expert-chunk", "8")
    assert _options("--algorithm", "gptq", *expert_flags) == GptqOptions(
        expert_policy=ExpertGptqPolicy.RTN, expert_min_tokens=64, expert_chunk=8
    )
    assert _options("--algorithm", "gptq", "--gptq-no-experts") == GptqOptions(experts=False)
    with pytest.raises(InvalidArgumentError, match="--gptq-no-experts apply to --algorithm gptq, not mse"):
        _options("--algorithm", "mse", "--gptq-no-experts")
    with pytest.raises(InvalidArgumentError, match="unknown gptq expert_policy 'sometimes'"):
        GptqOptions(expert_policy="sometimes")
    assert _options("--algorithm", "awq", "--awq-grid", "5", "--awq-clip") == AwqOptions(grid=5, clip=True)
    assert AwqOptions().clip and _options("--algorithm", "awq", "--no-awq-clip") == AwqOptions(clip=False)
    with pytest.raises(InvalidArgumentError, match="--awq-clip apply to --algorithm awq, not gptq"):
        _options("--algorithm", "gptq", "--no-awq-clip")
    assert _options("--algorithm", "smoothquant", "--smoothquant-alpha", "0.8") == SmoothQuantOptions(alpha=0.8)
    assert _options("--algorithm", "awq+gptq", "--gptq-damp", "0.1") == AwqOptions(then=GptqOptions(damp=0.1))
    assert _options("--algorithm", "smoothquant+gptq") == SmoothQuantOptions(then=GptqOptions())


def test_flags_of_another_algorithm_and_unavailable_algorithms_are_refused():
    with pytest.raises(InvalidArgumentError, match="--gptq-act-order apply to --algorithm gptq, not mse"):
        _options("--algorithm", "mse", "--gptq-act-order")
    with pytest.raises(InvalidArgumentError, match="--mse-steps apply to --algorithm mse, not max"):
        _options("--mse-steps", "4")
    with pytest.raises(InvalidArgumentError, match="--smoothquant-alpha apply to --algorithm smoothquant, not awq"):
        _options("--algorithm", "awq", "--smoothquant-alpha", "0.6")
    with pytest.raises(InvalidArgumentError, match="--gptq-act-order apply to --algorithm gptq, not awq"):
        _options("--algorithm", "awq", "--gptq-act-order")
    with pytest.raises(InvalidArgumentError, match="gptq damp must be in"):
        _options("--algorithm", "gptq", "--gptq-damp", "2")


def test_the_options_are_read_without_torch():
    probe = (
        "import sys; from quantport.cli import _parser; from quantport.quantize_args import algorithm_from_args; "
        "args = _parser(quantize_only=True).parse_args(['quantize', 'm', 'o', '--recipe', 'w4a16', "
        "'--algorithm', 'gptq', '--gptq-act-order']); "
        "print(algorithm_from_args(args).act_order, 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "False"]


def test_quantize_command_with_mse_writes_the_algorithm_in_the_report(tmp_path, capsys):
    out = tmp_path / "tiny-mse"
    args = ["quantize", "bundled:tiny-llama", str(out), "--recipe", "w4a16", "--algorithm", "mse"]
    code = main([*args, "--mse-steps", "4", "--calib-samples", "2", "--calib-seq-len", "32", "--device", "cpu"])
    assert code == 0
    assert "algorithm        : mse" in capsys.readouterr().out
    report = json.loads((out / "quantport_report.json").read_text())
    assert report["algorithm"] == "mse" and report["left_at_round_to_nearest"] == {}
    code = main([*args[:2], str(tmp_path / "x"), *args[3:], "--awq-grid", "4"])
    assert code != 0
    assert "--awq-grid apply to --algorithm awq, not mse" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
