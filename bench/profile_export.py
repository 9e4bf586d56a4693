"""Where does quantport.export spend time and memory? (diagnostic companion of dense_export.py)

    .venv/bin/python bench/profile_export.py fp8     # or nvfp4
    BENCH_THREADS=1 .venv/bin/python bench/profile_export.py fp8   # one torch thread

Uses the model and calibration batches that dense_export.py caches in bench/_work. Loads and
quantizes with quantport, then runs quantport.export with:
  * per-tensor instrumentation (time to compute each planned tensor, time to write it, VmRSS after),
  * a cProfile of the whole export call (top functions by cumulative and own time).
Prints a plain-text report; writes nothing outside bench/_work.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dense_export as de  # noqa: E402


def main() -> None:  # noqa: C901
    recipe = sys.argv[1] if len(sys.argv) > 1 else "fp8"
    import torch

    import quantport
    from quantport.export import shard_queue, shards
    from quantport.loading import load_model

    de.prepare()
    de._set_threads()  # BENCH_THREADS=1: robust to other processes on a shared machine
    batches = torch.load(de.CALIB_FILE)
    model, _ = load_model(de.MODEL_DIR, device="cpu")
    quantport.quantize(model, recipe, batches, progress=False)
    gb = 1e9
    print(f"RSS after quantize: {de.rss_bytes() / gb:.3f} GB (peak so far {de.peak_rss_bytes() / gb:.3f} GB)")

    # --- per-tensor instrumentation -------------------------------------------------------------
    events: list[tuple[str, float, float, int]] = []  # name, compute s, to-bytes s, rss after
    last: dict = {}
    totals = {"release_s": 0.0, "release_calls": 0}
    orig_tensor_bytes = shard_queue._tensor_bytes
    orig_write = shards.write_sharded_safetensors

    def traced_write(plan, directory, **kw):
        wrapped = []
        for e in plan:

            def compute(e=e):
                t0 = time.perf_counter()
                t = e.compute()
                last["entry"] = (e.name, time.perf_counter() - t0)
                return t

            wrapped.append(shards.PlannedTensor(e.name, e.spec, compute))
        after = kw.get("release")
        if after is not None:

            def timed_after():
                t0 = time.perf_counter()
                after()
                totals["release_s"] += time.perf_counter() - t0
                totals["release_calls"] += 1

            kw["release"] = timed_after
        return orig_write(wrapped, directory, **kw)

    def traced_tensor_bytes(tensor, entry):
        t0 = time.perf_counter()
        mv = orig_tensor_bytes(tensor, entry)
        name, compute_s = last.get("entry", (entry.name, 0.0))
        events.append((name, compute_s, time.perf_counter() - t0, de.rss_bytes()))
        return mv

    shard_queue._tensor_bytes = traced_tensor_bytes
    # write_sharded_safetensors is imported by name into the exporter modules: patch it everywhere.
    for mod in list(sys.modules.values()):
        if (
            getattr(mod, "__name__", "").startswith("quantport")
            and getattr(mod, "write_sharded_safetensors", None) is orig_write
        ):
            mod.write_sharded_safetensors = traced_write
    out = de.WORK / "out" / f"profile_{recipe}"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    rss0 = de.rss_bytes()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    quantport.export(model, out, progress=False)
    prof.disable()
    total = time.perf_counter() - t0
    print(
        f"export wall {total:.2f} s; RSS before {rss0 / gb:.3f} GB, after {de.rss_bytes() / gb:.3f} GB, "
        f"process peak {de.peak_rss_bytes() / gb:.3f} GB"
    )

    by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for name, c, w, _ in events:  # noqa: B007
        kind = name.rsplit(".", 1)[-1] if "layers." in name else name
        kind = {"weight": name.split(".")[-2] + ".weight"}.get(kind, kind) if "layers." in name else kind
        by_kind[kind][0] += c
        by_kind[kind][1] += w
        by_kind[kind][2] += 1
    print(
        f"\nsum compute {sum(e[1] for e in events):.2f} s, sum to-bytes {sum(e[2] for e in events):.2f} s "
        f"over {len(events)} tensors; release hook {totals['release_s']:.2f} s in "
        f"{totals['release_calls']} calls (rest = file writes / planning / python)"
    )
    print("per tensor kind: compute s, to-bytes s, count")
    for k, (c, w, n) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        print(f"  {k:32s} {c:7.3f} {w:7.3f} {n:5d}")
    print("\nRSS growth along the write (every ~10th tensor):")
    for i, (name, _c, _w, rss) in enumerate(events):
        if i % max(1, len(events) // 12) == 0 or i == len(events) - 1:
            print(f"  #{i:4d} {name:55s} RSS {(rss - rss0) / gb:+.3f} GB")

    s = io.StringIO()
    st = pstats.Stats(prof, stream=s)
    st.sort_stats("cumulative").print_stats(25)
    st.sort_stats("tottime").print_stats(15)
    print(s.getvalue())


if __name__ == "__main__":
    main()
