"""Peak memory of layer-by-layer quantization vs the number of layers (issue 12), side by side with the
whole-model path and nvidia-modelopt, on the CPU.

The same random Qwen3-MoE shape with 4, 16 and 64 decoder layers is saved as a bf16 checkpoint; each
(tool, layers) runs in its own process (``--worker``), which quantizes it to NVFP4 on the same calibration
tokens, exports it and prints its peak RSS (``ru_maxrss``). The target: layer by layer, the peak at 64 layers
is at most 1.3x the peak at 4 layers.

    .venv/bin/python bench/sequential_memory.py            # writes bench/results/sequential_memory.md
    .venv/bin/python bench/sequential_memory.py --tools "quantport --sequential" "quantport whole-model"

Each checkpoint is saved by a process of its own before the measured ones (a worker that built the model
would count the random model's memory in its peak).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
WORK = BENCH / "_work" / "sequential_memory"
RESULT = BENCH / "results" / "sequential_memory.md"
LAYERS = (4, 16, 64)
TOOLS = ("quantport --sequential", "quantport whole-model", "nvidia-modelopt")
SEQUENCES, SEQ_LEN = 16, 256

CONFIG = dict(
    hidden_size=512,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    intermediate_size=1024,
    moe_intermediate_size=256,
    num_experts=16,
    num_experts_per_tok=2,
    vocab_size=4096,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)


def _model_dir(layers: int) -> Path:
    directory = WORK / f"qwen3moe-{layers}l"
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(num_hidden_layers=layers, **CONFIG)).to(torch.bfloat16)
    model.config.architectures = ["Qwen3MoeForCausalLM"]
    model.save_pretrained(directory)
    return directory


def _batches():
    import torch

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG["vocab_size"], (SEQUENCES, SEQ_LEN), generator=generator)
    return list(ids.split(4))


def _worker(tool: str, layers: int, out: Path) -> dict:
    import torch

    start = time.perf_counter()
    directory = _model_dir(layers)
    batches = _batches()
    if tool == "nvidia-modelopt":
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)

        def loop(m):
            with torch.no_grad():
                for batch in batches:
                    m(input_ids=batch)

        mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, loop)
        export_hf_checkpoint(model, export_dir=str(out))
    else:
        import quantport
        from quantport.loading import load_model
        from quantport.sequential import open_layer_by_layer

        if tool.endswith("--sequential"):
            model = open_layer_by_layer(directory)
        else:
            model = load_model(directory, device="cpu", progress=False)[0]
        quantport.quantize(model, "nvfp4", batches, progress=False)
        quantport.export(model, out, progress=False)
    return {
        "tool": tool,
        "layers": layers,
        "seconds": time.perf_counter() - start,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "checkpoint_bytes": sum(f.stat().st_size for f in directory.glob("*.safetensors")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, metavar=("TOOL", "LAYERS", "OUT"))
    parser.add_argument("--prepare", type=int, metavar="LAYERS", help="only save the checkpoint of LAYERS layers")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--layers", nargs="+", type=int, default=list(LAYERS))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker[0], int(args.worker[1]), Path(args.worker[2]))))
        return
    if args.prepare:
        _model_dir(args.prepare)
        return
    tools, depths = tuple(args.tools), tuple(args.layers)
    WORK.mkdir(parents=True, exist_ok=True)
    for layers in depths:
        subprocess.run([sys.executable, __file__, "--prepare", str(layers)], check=True, capture_output=True)
    rows = []
    for layers in depths:
        for tool in tools:
            out = WORK / "out"
            shutil.rmtree(out, ignore_errors=True)
            run = subprocess.run(
                [sys.executable, __file__, "--worker", tool, str(layers), str(out)], capture_output=True, text=True
            )
            if run.returncode:
                raise SystemExit(f"{tool} {layers} layers failed:\n{run.stderr[-3000:]}")
            rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    shutil.rmtree(WORK / "out", ignore_errors=True)
    by = {(r["tool"], r["layers"]): r for r in rows}
    lines = [
        "# Peak host memory vs number of layers (issue 12)",
        "",
        f"`python bench/sequential_memory.py`: random Qwen3-MoE shape ({CONFIG['num_experts']} experts, hidden "
        f"{CONFIG['hidden_size']}), bf16 checkpoint, NVFP4, {SEQUENCES}x{SEQ_LEN} calibration tokens, CPU, one "
        "process per run (peak RSS = ru_maxrss).",
        "",
        "| tool | " + " | ".join(f"{n} layers" for n in depths) + f" | peak {depths[-1]} / peak {depths[0]} |",
        "|---|" + "---|" * (len(depths) + 1),
    ]
    for tool in tools:
        peaks = [by[(tool, n)]["peak_rss_bytes"] / 2**30 for n in depths]
        cells = " | ".join(
            f"{p:.2f} GiB ({by[(tool, n)]['seconds']:.0f} s)" for p, n in zip(peaks, depths, strict=True)
        )
        lines.append(f"| {tool} | {cells} | {peaks[-1] / peaks[0]:.2f}x |")
    sizes = ", ".join(f"{n} layers {by[(tools[0], n)]['checkpoint_bytes'] / 2**30:.2f} GiB" for n in depths)
    lines += ["", f"Checkpoint sizes (bf16): {sizes}.", ""]
    RESULT.write_text("\n".join(lines))
    (RESULT.with_suffix(".json")).write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
