"""One process of a distributed test run (or the single-process reference): ``python rank_worker.py SPEC.json``.

SPEC: ``{"out": DIR, "cases": [NAME, ...], "bad_batch": INDEX | null, "die_rank": RANK | null, "device": "cpu"}``
(``"cuda"``: each rank on ``cuda:LOCAL_RANK``, NCCL). Each case
quantizes a tiny model built from a config with :func:`quantport.quantize` and writes it with
:func:`quantport.export` to ``DIR/NAME``. Under torchrun's variables the run is distributed (gloo, CPU);
without them it is the plain path. ``bad_batch`` replaces that calibration batch with a 3-D tensor (the rank
that gets it fails); ``die_rank`` makes that rank exit abruptly before calibration. A
:class:`~quantport.errors.QuantportError` is printed as one ``error:`` line and the exit code is 2, as the CLI.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tiny_models, moe_models

import quantport  # noqa: E402
from moe_models import tiny_moe  # noqa: E402
from quantport.algorithm_options import Algorithm  # noqa: E402
from quantport.distributed import close_session, current_session  # noqa: E402
from quantport.errors import QuantportError  # noqa: E402
from tiny_models import TINY_MODELS, make_calibration_batches  # noqa: E402

CASES = {
    # name: (model, recipe, quantize options, number of calibration batches)
    "dense-fp8-kv": ("llama", "fp8", {"kv_cache": "fp8"}, 5),
    "dense-fp8-two-batches": ("llama", "fp8", {}, 2),  # with 3 ranks, rank 2 has no batch
    "dense-nvfp4": ("llama", "nvfp4", {}, 5),
    "dense-w4a16-kv": ("llama", "w4a16", {"kv_cache": "fp8"}, 5),
    "moe-fp8": ("qwen3_moe", "fp8", {}, 5),
    "moe-nvfp4": ("qwen3_moe", "nvfp4", {}, 5),
    "moe-w4a16-nvfp4": ("qwen3_moe", "w4a16-nvfp4", {}, 5),  # weight-only: calibrated for the expert coverage report
    "dense-w4a16-gptq": ("llama", "w4a16", {"algorithm": Algorithm.GPTQ.value}, 5),
}


def _model(kind: str) -> torch.nn.Module:
    return TINY_MODELS[kind](0) if kind in TINY_MODELS else tiny_moe(kind)


def run(spec: dict) -> None:
    out = Path(spec["out"])
    device = torch.device(spec.get("device", "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    for name in spec["cases"]:
        kind, recipe, options, batches = CASES[name]
        model = _model(kind).to(device)
        data = make_calibration_batches(vocab_size=model.config.vocab_size, n=batches, batch=2, seq=16)
        data = [batch.to(device) for batch in data]
        if spec.get("bad_batch") is not None:
            data[spec["bad_batch"]] = data[spec["bad_batch"]][None]
        if spec.get("die_rank") is not None and os.environ.get("RANK") == str(spec["die_rank"]):
            current_session(device)  # joined, then gone: the others are left waiting at a vote
            os._exit(3)
        quantport.quantize(model, recipe, data, progress=False, **options)
        quantport.export(model, out / name, progress=False)


def main() -> int:
    torch.set_num_threads(1)  # the same CPU kernels in every process: bit-equal activations
    spec = json.loads(Path(sys.argv[1]).read_text())
    try:
        run(spec)
    except QuantportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        close_session()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
