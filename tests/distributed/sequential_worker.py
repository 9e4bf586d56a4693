"""One process of a layer-by-layer distributed test run (or its single-process reference):
``python sequential_worker.py SPEC.json``.

SPEC: ``{"models": DIR, "out": DIR, "cases": [NAME, ...], "max_shard_size": SIZE | null,
"fail": {"rank": R, "at": "layer" | "export"} | null, "blind_rank": R | null, "record": DIR | null,
"device": "cpu" | "cuda"}`` (``"cuda"``: each rank on ``cuda:LOCAL_RANK``, NCCL). Each case (the cases of
:mod:`rank_worker`, and quantized propagation) opens the tiny model saved in ``DIR/KIND`` with
:func:`quantport.sequential.open_layer_by_layer`, quantizes it and exports it to ``OUT/NAME``. ``fail``: that
rank raises while it runs decoder layer 1 (``layer``) or while it writes its shard files (``export``).
``blind_rank``: that rank does not see the staging directory (as a rank on another node without a shared
file system). ``record``: each rank writes the names of the shard files it wrote to ``DIR/RANK.json``.
Errors are printed as one ``error:`` line, exit code 2, as the CLI.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tiny_models, moe_models

from rank_worker import CASES  # noqa: E402

import quantport  # noqa: E402
import quantport.distributed.shard_writers as shard_writers  # noqa: E402
import quantport.sequential.calibrate as sequential_calibrate  # noqa: E402
from quantport.distributed import close_session  # noqa: E402
from quantport.errors import QuantportError  # noqa: E402
from quantport.sequential import open_layer_by_layer  # noqa: E402
from tiny_models import make_calibration_batches  # noqa: E402

export_module = importlib.import_module("quantport.export")  # the package: quantport.export is the function
shards = importlib.import_module("quantport.export.shards")

SEQUENTIAL_CASES = {
    **CASES,
    "dense-w4a16": ("llama", "w4a16", {}, 5),  # weight-only: no forward, no statistics to reduce
    # each layer calibrated on the simulated quantized outputs of the one before (reduced statistics first)
    "moe-nvfp4-propagate-quantized": ("qwen3_moe", "nvfp4", {"propagate": "quantized"}, 5),
}


def _inject(spec: dict) -> None:
    rank = os.environ.get("RANK")
    fail = spec.get("fail")
    if fail is not None and rank == str(fail["rank"]):
        if fail["at"] == "layer":
            run_layer = sequential_calibrate._run_layer

            def failing(layer, index, *args, **kwargs):
                if index == 1:
                    raise RuntimeError("injected failure in decoder layer 1")
                return run_layer(layer, index, *args, **kwargs)

            sequential_calibrate._run_layer = failing
        else:

            def failing_write(*args, **kwargs):
                raise OSError("injected failure while writing shards")

            export_module.write_sharded_safetensors = failing_write
    if spec.get("blind_rank") is not None and rank == str(spec["blind_rank"]):
        shard_writers._reads_token = lambda staging, token: False


def _recorded(written: dict[str, list[str]]) -> type:
    class Recorded(shards.CheckpointFile):
        def __init__(self, path, *args, **kwargs):
            written[next(reversed(written))].append(Path(path).name)  # the case being exported
            super().__init__(path, *args, **kwargs)

    return Recorded


def run(spec: dict) -> None:
    models, out = Path(spec["models"]), Path(spec["out"])
    _inject(spec)
    written: dict[str, list[str]] = {}
    shards.CheckpointFile = _recorded(written)
    shard_size = spec.get("max_shard_size") or "5GB"
    device = torch.device(spec.get("device", "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    for name in spec["cases"]:
        kind, recipe, options, batches = SEQUENTIAL_CASES[name]
        written[name] = []
        model = open_layer_by_layer(models / kind, device=device)
        data = make_calibration_batches(vocab_size=model.config.vocab_size, n=batches, batch=2, seq=16)
        quantport.quantize(model, recipe, data, progress=False, **options)
        quantport.export(model, out / name, progress=False, max_shard_size=shard_size)
    if spec.get("record"):
        record = Path(spec["record"]) / f"{os.environ.get('RANK', '0')}.json"
        record.write_text(json.dumps({case: sorted(files) for case, files in written.items()}))


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
