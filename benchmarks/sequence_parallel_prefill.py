"""Prefill time and peak activation memory of one stage, with and without sequence
parallelism, at tp ranks in spawned processes (NCCL on GPU, gloo on CPU).

Random weights (no checkpoint) of a real config shape; one stage holding every layer, the
embedding and the head. Prints a table; asserts nothing.

    python3 benchmarks/sequence_parallel_prefill.py --shape llama3-8b --tokens 8192 --tp 2
    python3 benchmarks/sequence_parallel_prefill.py --shape tiny --tokens 300 --tp 2 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stageserve.launcher import free_port  # noqa: E402

SHAPES = {
    # Llama-3-8B's published config values.
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                      rope_theta=500000.0, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
                 rope_theta=10000.0, rms_norm_eps=1e-5),
}


def write_config(shape: str, out: Path) -> None:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, **SHAPES[shape]}
    (out / "config.json").write_text(json.dumps(cfg))


def worker(rank: int, args: argparse.Namespace, config_dir: str, port: int, results: dict) -> None:
    from shared.config import ModelConfig, ParallelConfig, StageLayout
    from stage_worker.attention_metadata import AttentionMetadata
    from stage_worker.distributed import RankPlacement, declare_tp_placement
    from stage_worker.distributed import TensorParallelGroup, set_tp_group
    from stage_worker.models.registry import build_model

    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    store = dist.TCPStore("127.0.0.1", port, args.tp, rank == 0)
    dist.init_process_group(backend, store=store, rank=rank, world_size=args.tp,
                            **({"device_id": device} if cuda else {}))
    config = ModelConfig.from_pretrained(config_dir)
    dtype = torch.bfloat16 if cuda else torch.float32
    layout = StageLayout(0, 1, 0, config.num_hidden_layers)
    parallel = ParallelConfig(1, args.tp, (config.num_hidden_layers,))
    declare_tp_placement(RankPlacement(parallel, 0, rank), device)
    set_tp_group(TensorParallelGroup(dist.group.WORLD, rank, args.tp, backend))
    n = args.tokens
    positions = torch.arange(n, device=device)
    input_ids = torch.randint(0, config.vocab_size, (n,), device=device)
    for sp in (False, True):
        model = build_model(config, layout, dtype, device, sequence_parallel=sp)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        meta = AttentionMetadata.for_prefill_without_cache([n], device)
        times = []
        if cuda:
            torch.cuda.synchronize()
            weights = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            for i in range(args.repeat + 1):
                dist.barrier()
                start = time.perf_counter()
                hidden = model(input_ids, positions, None, meta)
                model.compute_logits(hidden[-1:])
                if cuda:
                    torch.cuda.synchronize()
                if i:  # the first run warms up
                    times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated() - weights) if cuda else 0
        if rank == 0:
            results[sp] = (sorted(times)[len(times) // 2], peak)
        del model, hidden
        if cuda:
            torch.cuda.empty_cache()
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_config(args.shape, Path(tmp))
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(worker, args=(args, tmp, free_port(), results), nprocs=args.tp, join=True)
        print(f"prefill of {args.tokens} tokens, {args.shape}, tp={args.tp}, {args.device}, "
              f"median of {args.repeat}")
        print("| sequence parallel | time (ms) | peak activation (MiB, rank 0) |")
        print("| --- | --- | --- |")
        for sp in (False, True):
            t, peak = results[sp]
            print(f"| {'on' if sp else 'off'} | {t * 1000:.1f} | {peak / 2**20:.0f} |")


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    main()
