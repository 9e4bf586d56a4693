"""Per-tensor cost of the shard writer: 48,000 small tensors (an MoE-like run of packed weights, block scales and
two scalars per expert projection, 120 MB) written three times; prints wall and CPU seconds per write.

    PYTHONPATH=/tmp/writer-base/src python bench/small_tensor_writes.py base   # code without groups or witness
    PYTHONPATH=src python bench/small_tensor_writes.py new                      # groups + the self-check's witness

Results: bench/results/cpu_export_before_after.md.
"""

import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from quantport.export.shards import PlannedTensor, write_sharded_safetensors
from quantport.schemes import TensorSpec

gen = torch.Generator().manual_seed(0)
tensors = {}
for i in range(12000):  # an MoE-like run: per expert projection a packed weight, block scales, two scalars
    tensors[f"layers.{i // 384}.mlp.experts.{i % 384}.proj.weight"] = torch.randint(
        0, 256, (4096,), generator=gen, dtype=torch.uint8
    )
    tensors[f"layers.{i // 384}.mlp.experts.{i % 384}.proj.weight_scale"] = torch.rand(512, generator=gen).to(
        torch.float8_e4m3fn
    )
    tensors[f"layers.{i // 384}.mlp.experts.{i % 384}.proj.weight_scale_2"] = torch.rand((), generator=gen)
    tensors[f"layers.{i // 384}.mlp.experts.{i % 384}.proj.input_scale"] = torch.rand((), generator=gen)
plan = [PlannedTensor(n, TensorSpec(t.dtype, tuple(t.shape)), lambda t=t: t) for n, t in tensors.items()]
kw = {}
if sys.argv[1] == "new":
    from quantport.export.value_witness import ValueWitness
best = []
for _ in range(3):
    d = Path(tempfile.mkdtemp(dir="/tmp"))
    if sys.argv[1] == "new":
        kw = {"witness": ValueWitness()}
    t = time.perf_counter()
    c = time.process_time()
    write_sharded_safetensors(plan, d, progress=False, **kw)
    best.append((time.perf_counter() - t, time.process_time() - c))
    shutil.rmtree(d)
print(sys.argv[1], len(plan), "tensors", "wall/cpu", [(round(a, 3), round(b, 3)) for a, b in best])
