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
    copy.set(
        "model.layers.0.self_attn.q_proj.input_quantizer._amax", copy.get("model.layers.0.self_attn.q_proj.input_scale")
    )
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


def test_unreadable_shard_check_finding_and_inspect_exit_1(quantport_ckpt, edit, capsys):
    import os

    copy = edit(quantport_ckpt("llama", "fp8"))
    (copy.path / "model.safetensors").unlink()
    os.mkfifo(copy.path / "model.safetensors")
    assert run(["check", str(copy.path)]) == 1
    assert "shards.unreadable" in capsys.readouterr().out
    assert run(["inspect", str(copy.path)]) == 1
    captured = capsys.readouterr()
    assert "model.safetensors: a FIFO (named pipe), not a regular file" in captured.out
    assert captured.err.startswith("error: 1 problem(s): model.safetensors")


@pytest.mark.parametrize("command", ["check", "inspect"])
def test_library_errors_are_one_error_line_exit_2(quantport_ckpt, edit, capsys, monkeypatch, command):
    """A QuantportError or OSError escaping the library is one ``error:`` line, never a traceback."""
    from quantport.check import commands, runner
    from quantport.read import HeaderError

    copy = edit(quantport_ckpt("llama", "fp8"))
    target = copy.path / "model.safetensors"

    def broken(*args, **kwargs):
        raise HeaderError("cannot be read: Input/output error", path=target)

    def io_error(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(target))

    monkeypatch.setattr(runner.Checkpoint, "open", broken)
    assert run([command, str(copy.path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {target}: cannot be read: Input/output error\n"
    monkeypatch.setattr(runner.Checkpoint, "open", io_error)
    assert run([command, str(copy.path)]) == commands.EXIT_USAGE
    assert capsys.readouterr().err == f"error: {target}: Permission denied\n"
