"""Weight-load time and bytes read per rank: Hugging Face folder (slice reads) versus the
`save-sharded` folder (each rank reads its own files whole), at a (pp, tp) layout.

Each rank runs in its own process, builds its part of the model on its device and times
`load_weights`; the page cache is dropped before each format when the OS allows it (root on
Linux), otherwise the figure is a warm-cache one and the table says so. Prints a table;
asserts nothing.

    python3 benchmarks/load_time.py --model DIR --tp 2
    python3 benchmarks/load_time.py --random-model 1b --tp 2     # writes a random checkpoint first
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Random checkpoints of a given size (bf16), written with the demo tokenizer.
RANDOM_SHAPES = {
    "tiny": dict(num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128),
    "1b": dict(num_layers=16, hidden_size=2048, num_heads=16, num_kv_heads=8, intermediate_size=8192),
}


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def rank_load(rank: int, model_dir: str, pp: int, tp: int, device_type: str, results: dict) -> None:
    from shared.config import ModelConfig, ParallelConfig, dtype_from_name
    from shared.partition import even_layer_partition
    from shared.sharded_state import read_sharded_state
    from stage_worker.distributed import RankPlacement, declare_tp_placement
    from stage_worker.loader import load_weights
    from stage_worker.models.registry import build_model

    stage, tp_rank = divmod(rank, tp)
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    config = ModelConfig.from_pretrained(model_dir)
    state = read_sharded_state(model_dir)
    partition = tuple(state.layer_partition) if state else even_layer_partition(config.num_hidden_layers, pp)
    parallel = ParallelConfig(pp, tp, partition)
    placement = RankPlacement(parallel, stage, tp_rank)
    declare_tp_placement(placement, device)
    dtype = dtype_from_name("bfloat16" if device_type == "cuda" else "float32")
    model = build_model(config, parallel.stage_layout(stage), dtype, device)
    start = time.perf_counter()
    report = load_weights(model, model_dir)
    if device_type == "cuda":
        torch.cuda.synchronize(device)
    results[rank] = (time.perf_counter() - start, report.bytes_read, model.parameter_bytes())


def time_format(model_dir: str, pp: int, tp: int, device_type: str) -> dict:
    manager = mp.Manager()
    results = manager.dict()
    procs = [mp.get_context("spawn").Process(target=rank_load, args=(r, model_dir, pp, tp, device_type, results))
             for r in range(pp * tp)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return dict(results)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--random-model", choices=sorted(RANDOM_SHAPES), default=None)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from stageserve.demo_model import write_tiny_model

            model_dir = str(write_tiny_model(Path(tmp) / "hf", dtype="bfloat16", initializer_range=0.02,
                                             **RANDOM_SHAPES[args.random_model or "tiny"]))
        sharded = str(Path(tmp) / "sharded")
        subprocess.run([sys.executable, "-m", "stageserve.cli", "save-sharded", "--model", model_dir, "--pp",
                        str(args.pp), "--tp", str(args.tp), "--dtype", "bfloat16" if args.device == "cuda"
                        else "float32", "--out", sharded], check=True, stdout=subprocess.DEVNULL)
        total = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
        print(f"checkpoint {total / 2**30:.2f} GiB, pp={args.pp} tp={args.tp}, {args.device}")
        print("| format | cache | rank | load (s) | bytes read (MiB) | parameters held (MiB) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, folder in (("HF folder", model_dir), ("sharded", sharded)):
            cold = drop_page_cache()
            for rank, (seconds, read, held) in sorted(time_format(folder, args.pp, args.tp, args.device).items()):
                print(f"| {name} | {'cold' if cold else 'warm'} | {rank} | {seconds:.2f} | "
                      f"{read / 2**20:.0f} | {held / 2**20:.0f} |")


if __name__ == "__main__":
    main()
