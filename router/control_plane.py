"""Bringing the pipeline up: wait for the stages, check they form one model, size the KV
pool from their Profile answers, allocate it everywhere, wait until all serve."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from router.stage_client import StageClient
from shared.config import ModelConfig
from shared.proto import stage_worker_pb2 as pb

log = logging.getLogger("stageserve.router")


class BringUpError(RuntimeError):
    pass


@dataclass(frozen=True)
class CachePlan:
    block_size: int
    max_num_batched_tokens: int
    max_num_seqs: int
    gpu_memory_utilization: float
    # > 0: fixed KV bytes per rank, overriding profiling.
    kv_cache_bytes: int
    # > 0: cap on the pool, whatever the memory allows.
    max_kv_blocks: int = 0


@dataclass(frozen=True)
class PipelineState:
    infos: list[pb.StageInfo]
    profiles: list[pb.ProfileResponse]
    num_blocks: int
    # Stage whose Profile answer set the pool size.
    limiting_stage: int


def wait_until_ready(stages: list[StageClient], timeout_s: float) -> list[pb.StageInfo]:
    """Polls GetInfo until every stage has loaded its weights and joined the group."""
    deadline = time.monotonic() + timeout_s
    last_report = 0.0
    while True:
        infos: list[pb.StageInfo | None] = []
        for stage in stages:
            try:
                infos.append(stage.get_info())
            except grpc.RpcError:
                infos.append(None)
        failed = [i for i in infos if i is not None and i.state == pb.STAGE_STATE_FAILED]
        if failed:
            raise BringUpError(f"stage {failed[0].stage_index} failed: {failed[0].error}")
        ready = (pb.STAGE_STATE_READY, pb.STAGE_STATE_SERVING)
        if all(i is not None and i.state in ready for i in infos):
            return infos  # type: ignore[return-value]
        now = time.monotonic()
        if now > deadline:
            states = [
                f"{s.address}: " + ("unreachable" if i is None else pb.StageState.Name(i.state))
                for s, i in zip(stages, infos)
            ]
            raise BringUpError("stages not ready in time: " + ", ".join(states))
        if now - last_report > 10:
            last_report = now
            log.info(
                "waiting for stages: %s",
                ", ".join("down" if i is None else pb.StageState.Name(i.state) for i in infos),
            )
        time.sleep(0.2)


def check_layout(infos: list[pb.StageInfo], model: ModelConfig) -> None:
    """The stages, in the order the router was given them, must cover the model once."""
    expected_first = 0
    for position, info in enumerate(infos):
        if info.stage_index != position or info.num_stages != len(infos):
            raise BringUpError(
                f"the stage at position {position} reports stage {info.stage_index} of "
                f"{info.num_stages}; the router was given {len(infos)} stages in order"
            )
        if info.first_layer != expected_first:
            raise BringUpError(
                f"stage {position} starts at layer {info.first_layer}, expected {expected_first}"
            )
        if info.architecture != model.architecture or info.vocab_size != model.vocab_size:
            raise BringUpError(
                f"stage {position} serves {info.architecture} (vocab {info.vocab_size}); the router "
                f"has {model.architecture} (vocab {model.vocab_size})"
            )
        expected_first = info.last_layer
    if expected_first != model.num_hidden_layers:
        raise BringUpError(f"the stages cover {expected_first} of {model.num_hidden_layers} layers")
    if len({i.tp_size for i in infos}) != 1:
        raise BringUpError("every stage must use the same tensor-parallel size")


def bring_up(
    stages: list[StageClient], model: ModelConfig, plan: CachePlan, timeout_s: float
) -> PipelineState:
    infos = wait_until_ready(stages, timeout_s)
    check_layout(infos, model)
    request = pb.ProfileRequest(
        block_size=plan.block_size,
        max_num_batched_tokens=plan.max_num_batched_tokens,
        max_num_seqs=plan.max_num_seqs,
        gpu_memory_utilization=plan.gpu_memory_utilization,
        kv_cache_bytes=plan.kv_cache_bytes,
    )
    with ThreadPoolExecutor(len(stages)) as pool:
        profiles = list(pool.map(lambda s: s.profile(request), stages))
    limiting = min(range(len(stages)), key=lambda i: profiles[i].num_blocks)
    num_blocks = profiles[limiting].num_blocks
    if plan.max_kv_blocks > 0:
        num_blocks = min(num_blocks, plan.max_kv_blocks)
    for i, p in enumerate(profiles):
        log.info(
            "stage %d: weights %.1f MiB, peak activation %.1f MiB, room for %d KV blocks",
            i, p.weight_bytes / 2**20, p.peak_activation_bytes / 2**20, p.num_blocks,
        )
    if num_blocks < 1:
        raise BringUpError(
            f"stage {limiting} has no memory left for the KV cache "
            f"(budget {profiles[limiting].kv_budget_bytes} bytes); lower max_num_batched_tokens, "
            "raise the memory utilisation, or use more stages"
        )
    init = pb.InitCacheRequest(
        num_blocks=num_blocks, block_size=plan.block_size, max_num_seqs=plan.max_num_seqs
    )
    with ThreadPoolExecutor(len(stages)) as pool:
        list(pool.map(lambda s: s.init_cache(init), stages))
    deadline = time.monotonic() + 60
    while not all(s.is_serving() for s in stages):
        if time.monotonic() > deadline:
            raise BringUpError("stages did not report SERVING after InitCache")
        time.sleep(0.1)
    log.info("KV pool: %d blocks of %d tokens (limited by stage %d)", num_blocks, plan.block_size, limiting)
    return PipelineState(infos=infos, profiles=profiles, num_blocks=num_blocks, limiting_stage=limiting)
