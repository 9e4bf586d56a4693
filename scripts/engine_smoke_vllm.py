"""Run the smoke cases of ``manifest.json`` in vLLM (CPU), one process per case; print one line per case.

Runs in the vLLM venv (``scripts/engine-smoke.sh`` sets it up).

* A ``generate`` case passes when vLLM's greedy tokens equal transformers' greedy tokens on the same
  dequantized weights, or, where the two sequences part, when every position at which vLLM's top-1
  token (teacher-forced on transformers' sequence) differs is a near-tie for transformers (top-2
  log-probability margin below ``TIE``): vLLM and transformers already part at such ties in bf16
  without any quantization. The line also says whether vLLM's tokens equal quantport's full
  simulation (activations quantized as the engine does).
* A ``load`` case passes when vLLM gets through weight loading: vLLM-CPU has no static FP8 kernel,
  so an error after "Loading weights took" is expected; a KeyError or shape error is a failure.
* SKIP: this CPU lacks what vLLM-CPU's kernels for the case need. The CPU's flags are read from
  ``/proc/cpuinfo`` first and a case whose ``needs`` (e.g. ``avx512f`` for dense W4A16, ``amx_tile`` for every
  quantized MoE kernel) are missing is not run; a "no kernel" error at run time is a SKIP too.

A FAIL line shows the root cause: the last exception raised in the child (its traceback's final line, or the
last ``Error:`` line of its log that is not a wrapper such as "Engine core initialization failed"), never the
first warning of the log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

RESULT = "SMOKE_RESULT "
TIE = 0.1
"""Top-2 log-probability margin (nats) under which a disagreement is a near-tie, not an error."""
TIMEOUT_S = 600
LOADED = re.compile(r"Loading weights took|Model loading took")
NO_KERNEL = re.compile(
    r"Failed to find a kernel|No \w+ MoE backend supports|Unsupported \w+ MoE backend|"
    r"requires x86 with AVX-512 or AMX|requires AMX tile support"
)
LOG_PREFIX = re.compile(r"^(?:\(\S+ pid=\d+\) )?(?:[A-Z]+ \d\d-\d\d \d\d:\d\d:\d\d \[[^\]]+\] )?")
"""What vLLM puts before a line of a child's traceback: ``(Worker pid=N) ERROR 12-03 09:20:25 [file.py:953] ``."""
CAUSE = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|Interrupt)): (.*)$")
WRAPPERS = ("Engine core initialization failed", "WorkerProc initialization failed", "See root cause above")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
"""The flags vLLM-CPU's kernel choices depend on (printed in the header of the run)."""


def cpu_flags() -> tuple[str, set[str]]:
    """(model name, flags) of this machine's CPU, from /proc/cpuinfo."""
    name, flags = "unknown CPU", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name == "unknown CPU":
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return name, flags


def _run_case(case: dict) -> dict:
    """In the child process: build the engine, then generate and score transformers' tokens."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    result: dict = {"name": case["name"]}
    try:
        llm = LLM(
            model=case["path"],
            dtype="bfloat16",
            max_model_len=128,
            enforce_eager=True,
            skip_tokenizer_init=True,
            seed=0,
        )
    except Exception as exc:  # noqa: BLE001  (any failure is reported, not raised)
        result["error"] = f"{type(exc).__name__}: {exc}"
        return result
    result["loaded"] = True
    if case["mode"] != "generate":
        return result
    reference = case["transformers_tokens"]
    length = len(reference[0])
    greedy = SamplingParams(temperature=0.0, max_tokens=length, min_tokens=length, ignore_eos=True, detokenize=False)
    scoring = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, detokenize=False)
    try:
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in case["prompts"]], greedy)
        forced = [TokensPrompt(prompt_token_ids=p + t) for p, t in zip(case["prompts"], reference, strict=True)]
        scored = llm.generate(forced, scoring)
    except Exception as exc:  # noqa: BLE001
        result["error"] = f"{type(exc).__name__}: {exc}"
        return result
    result["tokens"] = [list(o.outputs[0].token_ids) for o in outputs]
    result["ranks"] = [
        [o.prompt_logprobs[len(p) + i][t].rank for i, t in enumerate(tokens)]
        for o, p, tokens in zip(scored, case["prompts"], reference, strict=True)
    ]
    return result


def _root_cause(log: str, fallback: str) -> str:
    """The last exception of the child that is not a wrapper of the worker's failure (a traceback's final line
    is the exception that was raised; warnings printed before it are not the cause), with the indented lines
    that continue its message (vLLM lists each kernel's reason on its own line)."""
    lines = [LOG_PREFIX.sub("", line, count=1) for line in log.splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        match = CAUSE.match(lines[i].strip())
        if not match or any(w in match.group(2) for w in WRAPPERS):
            continue
        message = [match.group(2).strip()]
        for follow in lines[i + 1 :]:
            if not follow.startswith(" ") or not follow.strip():
                break
            message.append(follow.strip())
        return f"{match.group(1)}: {' '.join(m for m in message if m)}"
    if fallback and not any(w in fallback for w in WRAPPERS):
        return fallback
    return fallback or "no exception in the log"


def _generate_verdict(case: dict, result: dict) -> tuple[str, str]:
    reference = case["transformers_tokens"]
    equal = sum(a == b for t, r in zip(result["tokens"], reference, strict=True) for a, b in zip(t, r, strict=True))
    total = sum(len(t) for t in reference)
    sim = "==" if result["tokens"] == case["simulated_tokens"] else "!="
    if result["tokens"] == reference:
        return "PASS", f"greedy tokens == transformers ({equal}/{total}), {sim} quantport simulation"
    disagreements = [
        margin
        for ranks, margins in zip(result["ranks"], case["margins"], strict=True)
        for rank, margin in zip(ranks, margins, strict=True)
        if rank != 1
    ]
    real = [m for m in disagreements if m >= TIE]
    detail = (
        f"greedy tokens != transformers ({equal}/{total} equal, {sim} quantport simulation); teacher-forced "
        f"top-1 differs at {len(disagreements)}/{total} positions, "
        f"{len(disagreements) - len(real)} near-ties (margin < {TIE})"
    )
    if real:
        detail += f", {len(real)} real (margins {', '.join(f'{m:.2f}' for m in real[:4])})"
    return ("FAIL" if real else "PASS"), detail


def _verdict(case: dict, result: dict, log: str) -> tuple[str, str]:
    """(PASS | FAIL | SKIP, detail)."""
    error = _root_cause(log, result.get("error", "")) if "error" in result else ""
    loaded = bool(result.get("loaded") or LOADED.search(log))
    if error and NO_KERNEL.search(error) and (case["mode"] == "generate" or not loaded):
        stage = "weights loaded, then" if loaded else "before loading weights"
        shown = error if len(error) <= 300 else f"{error[:140]} ... {error[-160:]}"  # the CPU kernel's reason last
        return "SKIP", f"no vLLM-CPU kernel on this machine ({stage}): {shown}"
    if case["mode"] == "load":
        if loaded and not re.search(r"KeyError|size mismatch|shape", error):
            return "PASS", "engine built" if result.get("loaded") else f"weights loaded, then: {error[:120]}"
        return "FAIL", error[:300] or "weights did not load"
    if "tokens" not in result:
        return "FAIL", error[:300] or "no output"
    return _generate_verdict(case, result)


def _spawn(case: dict) -> tuple[dict, str]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", json.dumps(case)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        return {"name": case["name"], "error": f"timeout after {TIMEOUT_S}s"}, str(exc.stdout or "")
    return _result_of(case, proc.stdout + proc.stderr, proc.returncode), proc.stdout + proc.stderr


def _result_of(case: dict, log: str, returncode: int | str = "?") -> dict:
    """The child's SMOKE_RESULT line, or an error made of the log's last lines."""
    for line in reversed(log.splitlines()):
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    tail = " | ".join(log.strip().splitlines()[-3:])
    return {"name": case["name"], "error": f"exit {returncode}: {tail}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("manifest", nargs="?", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--logs", type=Path, help="directory for each case's full vLLM log")
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="run nothing: judge each case again from the logs of an earlier run (--logs)",
    )
    args = parser.parse_args()
    if args.one:
        sys.stdout.write(RESULT + json.dumps(_run_case(json.loads(args.one))) + "\n")
        return 0
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    cpu, flags = cpu_flags()
    present = [f for f in CPU_FLAGS if f in flags]
    absent = [f for f in CPU_FLAGS if f not in flags]
    sys.stdout.write(
        f"CPU: {cpu}, {os.cpu_count()} cores; has {' '.join(present) or '-'}; lacks {' '.join(absent) or '-'}\n"
    )
    for case in json.loads(args.manifest.read_text()):
        missing = [f for f in case.get("needs", []) if f not in flags]
        if missing:
            status, detail = "SKIP", f"this CPU lacks {', '.join(missing)}, which vLLM-CPU's kernels for it need"
        elif args.rescore:
            log = (args.logs / f"{case['name']}.log").read_text()
            result = _result_of(case, log)
            status, detail = _verdict(case, result, log)
        else:
            result, log = _spawn(case)
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                (args.logs / f"{case['name']}.log").write_text(log)
            status, detail = _verdict(case, result, log)
        counts[status] += 1
        note = f" (known: {case['note']})" if case.get("note") and status == "FAIL" else ""
        sys.stdout.write(f"{status} {case['name']:<30} [{case['mode']}] {detail}{note}\n")
        sys.stdout.flush()
    sys.stdout.write(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped\n")
    return 0 if counts["FAIL"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
