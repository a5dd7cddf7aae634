"""Typed configuration of the server: model, KV cache, scheduler and HTTP layer.

Contract: each section is a pydantic model with unknown keys rejected; ``sparse-serve`` generates one
flag per field (``compress.cliutil.add_config_flags``), so the help text lives here. Defaults suit a
2-core CPU serving a ~100M-1B model; every value is overridable.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


API_KEY_ENV = "SPARSE_SERVE_API_KEY"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(_Strict):
    """Which checkpoint to serve and how to load it."""

    model: str = Field(description="checkpoint directory or bundled model name")
    served_model_name: str | None = Field(None, description="name clients use in 'model'; None: the directory name")
    dtype: Literal["bfloat16", "float32"] = Field("bfloat16", description="compute dtype")
    max_model_len: int | None = Field(None, ge=16, description="context length; None: the model's, at most 8192")
    dense: bool = Field(False, description="decompress sparse weights and serve dense (the baseline)")
    kernel: str | None = Field(None, description="force a sparse kernel (cpu_avx512, cpu_dense, reference)")
    dense_gemv: bool = Field(True, description="also keep dense weights row-major for the AVX-512 decode GEMV "
                                               "(one more copy of each untied dense weight; without it the blocked "
                                               "GEMM takes one and two rows: a decode step ~0.9x as fast)")
    argmax_screen: bool = Field(True, description="greedy steps pick the token through an int8 screen of the LM "
                                                  "head (exact: the full head's argmax, ties included; the head "
                                                  "1.4-1.9x faster on SmolLM2; half its bf16 bytes more memory)")
    huge_pages: bool = Field(True, description="place the weights decode streams in transparent huge pages "
                                               "(madvise; dense decode 1.24-1.35x faster on a 2-core Zen 4 VM)")
    variant: str | None = Field(None, description="metrics label 'variant'; None: dense, sparse or pruned, from the model")
    threads: int | None = Field(None, ge=1, description="torch threads; None: the CPUs this process may run on "
                                                        "(two 2-thread servers sharing 2 cores slow each other 10x)")


class CacheConfig(_Strict):
    """The paged KV cache."""

    block_size: int = Field(16, ge=1, description="tokens per KV-cache block")
    kv_cache_gb: float = Field(1.0, gt=0, description="memory for the KV cache in GiB")
    num_blocks: int | None = Field(None, ge=1, description="number of KV blocks (overrides --kv-cache-gb)")


class SchedulerConfig(_Strict):
    """Continuous batching limits."""

    max_num_seqs: int = Field(32, ge=1, description="most sequences in one step")
    max_num_batched_tokens: int = Field(512, ge=1, description="token budget of one step (chunked prefill)")
    max_waiting: int = Field(256, ge=0, description="waiting-queue bound; beyond it requests get 429")


class ServerConfig(_Strict):
    """The HTTP layer."""

    host: str = Field("127.0.0.1", description="address to bind (loopback by default)")
    port: int = Field(8000, ge=0, le=65535, description="port to bind (0: any free port)")
    api_key: str | None = Field(None, description="require 'Authorization: Bearer KEY' on /v1/*, /tokenize and "
                                                  f"/detokenize; None: the environment variable {API_KEY_ENV}")
    protect_metrics: bool = Field(False, description="also require the API key on /metrics and /health")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="largest request body (413 beyond)")
    max_n: int = Field(16, ge=1, description="largest 'n'")
    max_tokens_limit: int | None = Field(None, ge=1, description="largest max_tokens a request may ask for")
    max_stop: int = Field(16, ge=0, description="most stop strings per request")
    max_top_logprobs: int = Field(20, ge=0, description="largest top_logprobs")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM: seconds to finish running requests")
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 429")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")


class EngineConfig(_Strict):
    """Everything the engine needs (the server section aside)."""

    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
