from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StageState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_STATE_UNSPECIFIED: _ClassVar[StageState]
    STAGE_STATE_LOADING: _ClassVar[StageState]
    STAGE_STATE_JOINING: _ClassVar[StageState]
    STAGE_STATE_READY: _ClassVar[StageState]
    STAGE_STATE_SERVING: _ClassVar[StageState]
    STAGE_STATE_FAILED: _ClassVar[StageState]
STAGE_STATE_UNSPECIFIED: StageState
STAGE_STATE_LOADING: StageState
STAGE_STATE_JOINING: StageState
STAGE_STATE_READY: StageState
STAGE_STATE_SERVING: StageState
STAGE_STATE_FAILED: StageState

class GetInfoRequest(_message.Message):
    __slots__ = ("include_parameter_names",)
    INCLUDE_PARAMETER_NAMES_FIELD_NUMBER: _ClassVar[int]
    include_parameter_names: bool
    def __init__(self, include_parameter_names: _Optional[bool] = ...) -> None: ...

class RankLoadReport(_message.Message):
    __slots__ = ("tp_rank", "parameter_bytes", "bytes_read", "load_seconds")
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_BYTES_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    tp_rank: int
    parameter_bytes: int
    bytes_read: int
    load_seconds: float
    def __init__(self, tp_rank: _Optional[int] = ..., parameter_bytes: _Optional[int] = ..., bytes_read: _Optional[int] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("stage_index", "num_stages", "first_layer", "last_layer", "tp_size", "dtype", "device", "state", "error", "architecture", "has_embedding", "has_lm_head", "parameter_bytes", "parameter_names", "ranks", "num_kv_blocks", "block_size", "vocab_size", "max_position_embeddings", "num_layers", "model_path", "profile", "kv_cache_bytes", "sharded_state", "kv_cache_dtype")
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    FIRST_LAYER_FIELD_NUMBER: _ClassVar[int]
    LAST_LAYER_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    HAS_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    HAS_LM_HEAD_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_NAMES_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITION_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARDED_STATE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    stage_index: int
    num_stages: int
    first_layer: int
    last_layer: int
    tp_size: int
    dtype: str
    device: str
    state: StageState
    error: str
    architecture: str
    has_embedding: bool
    has_lm_head: bool
    parameter_bytes: int
    parameter_names: _containers.RepeatedScalarFieldContainer[str]
    ranks: _containers.RepeatedCompositeFieldContainer[RankLoadReport]
    num_kv_blocks: int
    block_size: int
    vocab_size: int
    max_position_embeddings: int
    num_layers: int
    model_path: str
    profile: ProfileResponse
    kv_cache_bytes: int
    sharded_state: bool
    kv_cache_dtype: str
    def __init__(self, stage_index: _Optional[int] = ..., num_stages: _Optional[int] = ..., first_layer: _Optional[int] = ..., last_layer: _Optional[int] = ..., tp_size: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., state: _Optional[_Union[StageState, str]] = ..., error: _Optional[str] = ..., architecture: _Optional[str] = ..., has_embedding: _Optional[bool] = ..., has_lm_head: _Optional[bool] = ..., parameter_bytes: _Optional[int] = ..., parameter_names: _Optional[_Iterable[str]] = ..., ranks: _Optional[_Iterable[_Union[RankLoadReport, _Mapping]]] = ..., num_kv_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_position_embeddings: _Optional[int] = ..., num_layers: _Optional[int] = ..., model_path: _Optional[str] = ..., profile: _Optional[_Union[ProfileResponse, _Mapping]] = ..., kv_cache_bytes: _Optional[int] = ..., sharded_state: _Optional[bool] = ..., kv_cache_dtype: _Optional[str] = ...) -> None: ...

class ProfileRequest(_message.Message):
    __slots__ = ("block_size", "max_num_batched_tokens", "max_num_seqs", "gpu_memory_utilization", "kv_cache_bytes")
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    block_size: int
    max_num_batched_tokens: int
    max_num_seqs: int
    gpu_memory_utilization: float
    kv_cache_bytes: int
    def __init__(self, block_size: _Optional[int] = ..., max_num_batched_tokens: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., gpu_memory_utilization: _Optional[float] = ..., kv_cache_bytes: _Optional[int] = ...) -> None: ...

class ProfileResponse(_message.Message):
    __slots__ = ("num_blocks", "weight_bytes", "peak_activation_bytes", "block_bytes", "kv_budget_bytes")
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_ACTIVATION_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    weight_bytes: int
    peak_activation_bytes: int
    block_bytes: int
    kv_budget_bytes: int
    def __init__(self, num_blocks: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., peak_activation_bytes: _Optional[int] = ..., block_bytes: _Optional[int] = ..., kv_budget_bytes: _Optional[int] = ...) -> None: ...

class InitCacheRequest(_message.Message):
    __slots__ = ("num_blocks", "block_size", "max_num_seqs")
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    block_size: int
    max_num_seqs: int
    def __init__(self, num_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., max_num_seqs: _Optional[int] = ...) -> None: ...

class InitCacheResponse(_message.Message):
    __slots__ = ("kv_cache_bytes", "cuda_graph_sizes", "graph_capture_seconds")
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPH_SIZES_FIELD_NUMBER: _ClassVar[int]
    GRAPH_CAPTURE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    kv_cache_bytes: int
    cuda_graph_sizes: _containers.RepeatedScalarFieldContainer[int]
    graph_capture_seconds: float
    def __init__(self, kv_cache_bytes: _Optional[int] = ..., cuda_graph_sizes: _Optional[_Iterable[int]] = ..., graph_capture_seconds: _Optional[float] = ...) -> None: ...

class StageSamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "min_p", "seed", "repetition_penalty", "presence_penalty", "frequency_penalty", "top_logprobs", "return_logprob")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    top_logprobs: int
    return_logprob: bool
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., min_p: _Optional[float] = ..., seed: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., top_logprobs: _Optional[int] = ..., return_logprob: _Optional[bool] = ...) -> None: ...

class NewSequence(_message.Message):
    __slots__ = ("seq_id", "prompt_token_ids", "output_token_ids", "sampling")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: StageSamplingParams
    def __init__(self, seq_id: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., output_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[StageSamplingParams, _Mapping]] = ...) -> None: ...

class ScheduledSequence(_message.Message):
    __slots__ = ("seq_id", "start_position", "num_tokens", "new_block_ids", "append_token_id", "sample", "append_sampled")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    APPEND_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    APPEND_SAMPLED_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    start_position: int
    num_tokens: int
    new_block_ids: _containers.RepeatedScalarFieldContainer[int]
    append_token_id: int
    sample: bool
    append_sampled: bool
    def __init__(self, seq_id: _Optional[int] = ..., start_position: _Optional[int] = ..., num_tokens: _Optional[int] = ..., new_block_ids: _Optional[_Iterable[int]] = ..., append_token_id: _Optional[int] = ..., sample: _Optional[bool] = ..., append_sampled: _Optional[bool] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("step_id", "drop_seq_ids", "new_seqs", "seqs", "reset", "forward_sampled_tokens")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    DROP_SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    NEW_SEQS_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    FORWARD_SAMPLED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    drop_seq_ids: _containers.RepeatedScalarFieldContainer[int]
    new_seqs: _containers.RepeatedCompositeFieldContainer[NewSequence]
    seqs: _containers.RepeatedCompositeFieldContainer[ScheduledSequence]
    reset: bool
    forward_sampled_tokens: bool
    def __init__(self, step_id: _Optional[int] = ..., drop_seq_ids: _Optional[_Iterable[int]] = ..., new_seqs: _Optional[_Iterable[_Union[NewSequence, _Mapping]]] = ..., seqs: _Optional[_Iterable[_Union[ScheduledSequence, _Mapping]]] = ..., reset: _Optional[bool] = ..., forward_sampled_tokens: _Optional[bool] = ...) -> None: ...

class TokenAlternative(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class SampledToken(_message.Message):
    __slots__ = ("seq_id", "token_id", "logprob", "top")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    token_id: int
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[TokenAlternative]
    def __init__(self, seq_id: _Optional[int] = ..., token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[TokenAlternative, _Mapping]]] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("step_id", "stage_index", "tokens", "error", "compute_seconds", "phase_seconds")
    class PhaseSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PHASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    stage_index: int
    tokens: _containers.RepeatedCompositeFieldContainer[SampledToken]
    error: str
    compute_seconds: float
    phase_seconds: _containers.ScalarMap[str, float]
    def __init__(self, step_id: _Optional[int] = ..., stage_index: _Optional[int] = ..., tokens: _Optional[_Iterable[_Union[SampledToken, _Mapping]]] = ..., error: _Optional[str] = ..., compute_seconds: _Optional[float] = ..., phase_seconds: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Shutdown(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RankCommand(_message.Message):
    __slots__ = ("step", "profile", "init_cache", "shutdown")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    INIT_CACHE_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    step: StepRequest
    profile: ProfileRequest
    init_cache: InitCacheRequest
    shutdown: Shutdown
    def __init__(self, step: _Optional[_Union[StepRequest, _Mapping]] = ..., profile: _Optional[_Union[ProfileRequest, _Mapping]] = ..., init_cache: _Optional[_Union[InitCacheRequest, _Mapping]] = ..., shutdown: _Optional[_Union[Shutdown, _Mapping]] = ...) -> None: ...

class RankReady(_message.Message):
    __slots__ = ("tp_rank", "parameter_names", "parameter_bytes", "bytes_read", "load_seconds")
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_NAMES_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_BYTES_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    tp_rank: int
    parameter_names: _containers.RepeatedScalarFieldContainer[str]
    parameter_bytes: int
    bytes_read: int
    load_seconds: float
    def __init__(self, tp_rank: _Optional[int] = ..., parameter_names: _Optional[_Iterable[str]] = ..., parameter_bytes: _Optional[int] = ..., bytes_read: _Optional[int] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class RankReply(_message.Message):
    __slots__ = ("step", "profile", "init_cache", "ready", "fatal_error", "loaded")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    INIT_CACHE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    FATAL_ERROR_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    step: StepResult
    profile: ProfileResponse
    init_cache: InitCacheResponse
    ready: RankReady
    fatal_error: str
    loaded: RankReady
    def __init__(self, step: _Optional[_Union[StepResult, _Mapping]] = ..., profile: _Optional[_Union[ProfileResponse, _Mapping]] = ..., init_cache: _Optional[_Union[InitCacheResponse, _Mapping]] = ..., ready: _Optional[_Union[RankReady, _Mapping]] = ..., fatal_error: _Optional[str] = ..., loaded: _Optional[_Union[RankReady, _Mapping]] = ...) -> None: ...

class RejoinRequest(_message.Message):
    __slots__ = ("epoch",)
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    def __init__(self, epoch: _Optional[int] = ...) -> None: ...

class RejoinResponse(_message.Message):
    __slots__ = ("state", "epoch")
    STATE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    state: StageState
    epoch: int
    def __init__(self, state: _Optional[_Union[StageState, str]] = ..., epoch: _Optional[int] = ...) -> None: ...
