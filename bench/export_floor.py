"""What quantport's FP8 export of dense_export.py's model cannot go below on this machine.

    .venv/bin/python bench/export_floor.py            # prints a Markdown section (append it to RESULTS.md)
    .venv/bin/python bench/export_floor.py --repeats 5

Uses the model and calibration batches dense_export.py caches in bench/_work. In one process, after
loading and quantizing with quantport (FP8), it times (minimum over the repeats):

* the disk: writing as many bytes as the checkpoint has through quantport's writer held to ``O_DIRECT``
  (``CheckpointFile``), from one reused buffer, with the CPU idle and with torch busy on all its threads
  (during an export, quantization shares the two cores with the writer); and the same bytes through
  the page cache, as safetensors writes them;
* the arithmetic: FP8 codes of every quantized weight (``w / scale`` then the fp8 cast, what the
  reference computes too), weights resident, results dropped;
* quantport.export itself, into a fresh directory each time.

An export that overlaps perfectly takes at least the larger of the write and the arithmetic.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dense_export as de  # noqa: E402


def _times(fn, repeats: int, before=None) -> list[float]:
    out = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _min_time(fn, repeats: int, before=None) -> float:
    return min(_times(fn, repeats, before))


def _write_buffered(path: Path, total: int) -> None:
    """The same bytes through the page cache, as safetensors (the reference's writer) writes them."""
    chunk = bytes([7]) * (8 << 20)
    with open(path, "wb") as handle:
        for start in range(0, total, len(chunk)):
            handle.write(chunk[: min(len(chunk), total - start)])
    path.unlink()


def _write_bytes(path: Path, total: int) -> None:
    import torch

    from quantport.export.checkpoint_file import CheckpointFile, WriteRoute

    source = torch.full((8 << 20,), 7, dtype=torch.uint8)
    with CheckpointFile(path, route=WriteRoute(settled_direct=True)) as handle:
        for start in range(0, total, source.numel()):
            handle.write(source[: min(source.numel(), total - start)])
    path.unlink()


class _BusyCpu:
    """torch elementwise work on all intra-op threads, in a thread, until the block ends."""

    def __enter__(self) -> _BusyCpu:
        import torch

        self._stop = threading.Event()
        x = torch.randn(4 << 20)

        def burn() -> None:
            while not self._stop.is_set():
                (x * 1.0001).sum()

        self._thread = threading.Thread(target=burn, daemon=True)
        self._thread.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    import quantport
    from quantport import kernels
    from quantport.formats.fp8 import fp8_scale_from_amax
    from quantport.loading import load_model
    from quantport.memory.mapped_weights import MappedWeights
    from quantport.modules.quant_linear import QuantLinear

    de.prepare()
    torch.set_grad_enabled(False)
    model, _ = load_model(de.MODEL_DIR, device="cpu")
    quantport.quantize(model, "fp8", torch.load(de.CALIB_FILE), progress=False)
    out = de.WORK / "floor_out"
    shutil.rmtree(out, ignore_errors=True)
    quantport.export(model, out, progress=False)
    checkpoint_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    scratch = de.WORK / "floor_write.bin"

    write_idle = _min_time(lambda: _write_bytes(scratch, checkpoint_bytes), args.repeats)
    with _BusyCpu():
        write_busy = _min_time(lambda: _write_bytes(scratch, checkpoint_bytes), args.repeats)
    write_cached = _times(lambda: _write_buffered(scratch, checkpoint_bytes), args.repeats)

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    scales = [fp8_scale_from_amax(m.weight_amax()) for m in layers]
    for m in layers:  # resident: this measures arithmetic, not page faults
        m.weight.sum()

    def codes() -> None:
        for m, scale in zip(layers, scales, strict=True):
            kernels.quantize_fp8_per_tensor(m.weight.detach(), scale, in_range=True)

    arithmetic = _min_time(codes, args.repeats)
    export = _min_time(
        lambda: quantport.export(model, out, progress=False),
        args.repeats,
        before=lambda: (shutil.rmtree(out, ignore_errors=True), time.sleep(0.3)),
    )
    MappedWeights().release_all()
    shutil.rmtree(out, ignore_errors=True)

    gb = 1e9
    weights = sum(m.weight.numel() for m in layers)
    print("## FP8 export: the floor on this machine (`bench/export_floor.py`)")
    print()
    print(
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}; minimum of {args.repeats} each, one process, model of `dense_export.py` "
        f"quantized with quantport (FP8). Checkpoint {checkpoint_bytes / gb:.3f} GB; "
        f"{weights / 1e9:.3f} B weights to quantize."
    )
    print()
    print("| what | s |")
    print("|---|---:|")
    print(f"| write {checkpoint_bytes / gb:.3f} GB with `O_DIRECT` (quantport's writer), CPU idle | {write_idle:.3f} |")
    print(f"| the same while torch computes on all its threads | {write_busy:.3f} |")
    print(
        "| the same bytes through the page cache, as safetensors writes them (returns before the disk has them), "
        f"first run / fastest (later runs reuse the pages the previous file freed) | {write_cached[0]:.3f} / "
        f"{min(write_cached):.3f} |"
    )
    print(f"| FP8 codes of every quantized weight (`w / scale`, fp8 cast), weights resident | {arithmetic:.3f} |")
    print(f"| quantport.export (FP8), fresh directory | {export:.3f} |")
    print()
    direct_bound = max(write_busy, arithmetic)
    cached_bound = max(write_cached[0], arithmetic)
    print(
        f"Bounds for a perfectly overlapped export: writing with `O_DIRECT` only, max(write while busy, arithmetic) "
        f"= {direct_bound:.3f} s; through fresh page-cache pages, max(first page-cache write, arithmetic) = "
        f"{cached_bound:.3f} s. quantport's writer takes the page cache while it is at least as fast as `O_DIRECT` "
        f"and `O_DIRECT` after; its export took {export:.3f} s, {export / min(direct_bound, cached_bound):.2f}x the "
        "lower bound (the rest: page faults on the memory-mapped weights and their release, the unquantized "
        "embeddings' copy, configs, staging and rename). Page-cache writes are fast only into memory the VM "
        "still backs (pages freed moments ago, or a host with memory to spare)."
    )


if __name__ == "__main__":
    main()
