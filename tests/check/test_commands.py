"""``quantport check`` / ``inspect`` through ``add_commands``: output and exit codes."""

from __future__ import annotations

import argparse
import json

import pytest

from quantport.check.commands import add_commands


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="quantport")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_check_valid_checkpoint_exits_0(quantport_ckpt, capsys):
    assert run(["check", str(quantport_ckpt("llama", "fp8"))]) == 0
    out = capsys.readouterr().out
    assert "OK (0 errors, 0 warnings)" in out and "engine vllm" in out


def test_check_errors_exit_1_with_table_and_fix(quantport_ckpt, edit, capsys):
    copy = edit(quantport_ckpt("llama", "nvfp4"))
    copy.hf_quant(lambda q: q.pop("group_size"))
    assert run(["check", str(copy.path)]) == 1
    out = capsys.readouterr().out
    assert "hfq.group-size" in out and "fix:" in out and "FAILED" in out


def test_check_json(quantport_ckpt, edit, capsys):
    copy = edit(quantport_ckpt("llama", "fp8"))
    copy.set("model.layers.0.self_attn.q_proj.input_quantizer._amax", copy.get("model.layers.0.self_attn.q_proj"
                                                                            ".input_scale"))
    assert run(["check", str(copy.path), "--json", "--engine", "sglang"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["engine"] == "sglang" and data["format"] == "modelopt"
    assert data["summary"]["errors"] == 1 and data["summary"]["by_rule"] == {"stray.amax": 1}
    finding = data["findings"][0]
    assert set(finding) == {"severity", "rule", "target", "message", "fix"} and finding["severity"] == "error"


def test_warnings_only_exit_0(quantport_ckpt, edit, capsys):
    copy = edit(quantport_ckpt("llama", "fp8", kv=True))
    copy.quant_config(lambda q: q.pop("kv_cache_scheme"))
    copy.hf_quant(lambda q: q.__setitem__("kv_cache_quant_algo", None))
    assert run(["check", str(copy.path)]) == 0
    assert "kv.unused" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["check", "inspect"])
def test_missing_directory_exits_2(tmp_path, capsys, command):
    assert run([command, str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_engine_is_an_argparse_error(tmp_path):
    with pytest.raises(SystemExit):
        run(["check", str(tmp_path), "--engine", "trtllm"])
