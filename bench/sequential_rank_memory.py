"""What one rank holds on the layer-by-layer path under torchrun, for 1 to N ranks (issue 15), on the CPU.

A random Qwen3-MoE-shaped checkpoint is opened layer by layer; for each number of ranks N, the layer inputs
of every rank's share of the calibration batches (batch i on rank i mod N) are captured as each rank does,
and the bytes it keeps between layers are counted (hidden states, and the per-batch arguments every layer
gets: rotary tensors, masks; each storage once). Printed beside them: the resident part every rank holds
(embeddings, final norm, output head) and one decoder layer's weights (one while calibrating, up to two
while exporting). The resident part and the layer do not shrink with N; the hidden states do.

    PYTHONPATH=src .venv/bin/python bench/sequential_rank_memory.py [--batches 16 --batch 4 --seq 256]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def _bytes(value, seen: set[int]) -> int:
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        if value.is_meta or storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(value, (tuple, list)):
        return sum(_bytes(v, seen) for v in value)
    if isinstance(value, dict):
        return sum(_bytes(v, seen) for v in value.values())
    return 0


def main() -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from quantport.distributed.batches import RankShare
    from quantport.sequential import layer_store_of, open_layer_by_layer
    from quantport.sequential.capture import capture_layer_inputs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        hidden_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=64, intermediate_size=1024,
        moe_intermediate_size=256, num_experts=16, num_experts_per_tok=2, vocab_size=4096, num_hidden_layers=4,
        max_position_embeddings=1024,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        Qwen3MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(Path(tmp) / "model")
        model = open_layer_by_layer(Path(tmp) / "model")
        store = layer_store_of(model)
        resident = _bytes(list(model.state_dict().values()), set())
        layer = _bytes(list(store.load(0).state_dict().values()), set())
        store.free(0)
        print(f"resident (every rank): {resident / 2**20:.2f} MiB; one decoder layer: {layer / 2**20:.2f} MiB")
        batches = [torch.randint(0, 4096, (args.batch, args.seq)) for _ in range(args.batches)]
        print("| ranks | hidden states per rank (MiB) | layer arguments per rank (MiB) | all ranks (MiB) |")
        print("|---|---|---|---|")
        for n in args.ranks:
            kept = []
            for rank in range(n):
                inputs = capture_layer_inputs(
                    model, store.skeleton.layers, RankShare(batches, rank, n), store.device, empty_ok=True
                )
                seen: set[int] = set()
                hidden = _bytes(inputs.hidden, seen)
                kept.append((hidden, _bytes(inputs.calls, seen)))
            most = max(kept, key=lambda k: k[0] + k[1])
            total = sum(h + c for h, c in kept)
            print(f"| {n} | {most[0] / 2**20:.2f} | {most[1] / 2**20:.2f} | {total / 2**20:.2f} |")


if __name__ == "__main__":
    main()
