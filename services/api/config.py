"""ServeConfig: how `actstore serve` runs the service (the flags are generated from it)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from actstore.errors import ConfigError
from services.api.steering import SteerOptions


@dataclass(frozen=True)
class ServeConfig:
    """One running service over one index folder; never written to disk (it may hold a token)."""

    index: str
    """Index folder (from `actstore index`)."""
    host: str = "127.0.0.1"
    """Bind address; the default serves this machine only."""
    port: int = 8000
    """TCP port."""
    token: str | None = None
    """Require 'Authorization: Bearer TOKEN' on the API routes; default $ACTSTORE_TOKEN, else none."""
    workers: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))
    """uvicorn worker processes (default 2, 1 on a single core): with one, a burst of clients queues behind a
    single event loop (see benchmarks/bench_service.py)."""
    ray: bool = False
    """Serve through Ray Serve instead of plain uvicorn (replicas across a Ray cluster)."""
    replicas: int = 1
    """Ray Serve replicas."""
    address: str | None = None
    """Ray cluster address for --ray (default RAY_ADDRESS, else a local Ray)."""
    compare: str | None = None
    """Comparison folder (from `actstore compare`) one of whose sides is this index: the page shows each feature's
    matches in the other SAE, with that SAE's top images."""
    steer: tuple[str, ...] = ()
    """Heads the steering dashboards and POST /steer may read out: model, zeroshot[:FILE], probe:DIR, vlm,
    generate[:PIPELINE[@ADAPTER]] (the index's SAE is spliced into its store's backbone, loaded on the first steering
    request); none: no steering."""
    steer_timeout: float = 30.0
    """Seconds a steering request may take, the model's loading included; past it the request is stopped (at its
    next pass, a VLM's next token, or a generator's next denoising step) and answered 503."""
    steer_device: str = "auto"
    """Where the steering model runs: auto (cuda when present, else cpu), cpu, cuda, cuda:N; each worker loads its
    own copy (a VLM or a generator's pipeline in its checkpoint's dtype)."""
    steer_slots: int = 2
    """Steering requests in flight per worker at most (one runs, the others wait for the model); one more is
    answered 429 at once, with Retry-After."""
    steer_retry_after: int = 2
    """Seconds the 429's Retry-After asks a client to wait."""
    steer_nice: int = 0
    """CPU priority of each worker's steering process (Linux nice, 0-19): 0 shares the CPU evenly (the event loop is
    another process, so browsing keeps its pace: see benchmarks/bench_steer_load.py); up to 19 lets everything else on
    the machine go first, at the cost of steering requests missing their bound on a busy machine."""
    steer_threads: int | None = None
    """torch's CPU threads per worker for steering; default: the machine's cores / workers, less one for the worker's
    event loop (at least 1): on a busy CPU, a thread team as wide as the machine stalls every pass for seconds."""
    fidelity_check: bool = True
    """Before steering, check that the rebuilt backbone makes the store's activations (--no-fidelity-check: steer
    anyway, with a warning in the log)."""
    trust_remote_code: bool = False
    """Run the modeling code an hf: model ships (a remote-code VLM's tower, for --steer vlm); the store never records
    it, so serving such a model needs it again."""
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    """fsspec options for reading the dataset's images."""

    def __post_init__(self) -> None:
        for name in ("workers", "replicas"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        object.__setattr__(self, "steer", tuple(self.steer))
        self.steer_options()
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be in [0, 65536), got {self.port}")

    def steer_options(self) -> SteerOptions:
        """The --steer-* settings (checked)."""
        threads = self.steer_threads
        if threads is None:
            threads = max(1, (os.cpu_count() or 1) // (1 if self.ray else self.workers) - 1)
        return SteerOptions(self.steer_timeout, self.steer_device, self.steer_slots, self.steer_retry_after, threads,
                            self.steer_nice, self.fidelity_check, self.trust_remote_code)
