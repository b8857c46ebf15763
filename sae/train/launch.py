"""Running a TrainConfig: in this process, or data-parallel in Ray Train workers (one Trainer per rank).

Credentials stay out of Ray's records. Ray Train keeps the train loop config as the run's state (the
dashboard's Train view, export events under the session's logs; the controller's creation arguments sit in
the GCS), so the loop config holds the run's config redacted (public_config, for people to read) and the
config itself travels as an object-store reference (ray.put) that each worker reads back with ray.get: its
storage_options, and any user:password@ in its URLs, enter no record. The value stays in the object store's
memory while the run holds the reference (Ray writes an object to disk only to spill it from a full store).
Environment variables for the workers (runtime_env env_vars) would not do: the dashboard shows runtime_env.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, replace
from typing import Any

from actstore.cluster import init_ray, refuse_local_paths_on_a_cluster
from actstore.config import public_config
from actstore.errors import user_error
from actstore.store import ActivationStore, filesystem, is_local
from sae.train.config import TrainConfig
from sae.train.sinks import METRICS, read_metrics
from sae.train.trainer import Trainer, check_fresh_out, read_resume_state, sweep_configs


def _ray_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    Trainer(TrainConfig(**ray.get(config["cfg"])), rank, ctx.get_world_size()).fit(progress=rank == 0,
                                                                                   stop_at=config["stop_at"])


def train(cfg: TrainConfig, progress: bool = True, stop_after: int | None = None) -> list[dict[str, Any]]:
    """Run a training config: in this process, or data-parallel through Ray Train; returns the last metrics.

    A run folder with a checkpoint is resumed. `stop_after`: stop after this many steps from where this call
    starts (checkpointing there; a later call resumes).
    """
    if cfg.num_workers == 1:
        return Trainer(cfg).fit(progress=progress, stop_after=stop_after) or _last_metrics(cfg)
    refuse_local_paths_on_a_cluster(cfg.address, store=cfg.store, out=cfg.out)
    # workers run elsewhere (other folders, other nodes): local paths are made absolute here
    cfg = replace(cfg, **{k: os.path.abspath(getattr(cfg, k)) for k in ("store", "out") if is_local(getattr(cfg, k))})
    # the sweep's and the run folder's checks here, once: a ConfigError in a worker would be retried by the
    # failure policy (cfg.max_failures restarts; node preemptions have Ray's own, unlimited, budget)
    sweep_configs(cfg, ActivationStore(cfg.store, dict(cfg.storage_options)).layer(cfg.layer).d)
    fs, root = filesystem(cfg.out, dict(cfg.storage_options))
    state = read_resume_state(cfg, fs, root)
    if state is None:
        check_fresh_out(cfg)
    stop_at = None if stop_after is None else (state["step"] if state else 0) + stop_after

    import ray  # imported here: Ray takes seconds to import and single-process runs never need it
    import ray.train
    from ray.train.torch import TorchTrainer

    init_ray(cfg.address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    # Ray Train's own files (a storage marker; no checkpoints: ours live in `out`) go to a temporary folder on
    # this node (the controller runs here), never into `out` or the working directory; removed afterwards
    storage = tempfile.mkdtemp(prefix="actstore-raytrain-")
    try:
        # Ray records the loop config: the config goes by reference, for people only redacted (see the top)
        loop_config = {"config": public_config(cfg), "cfg": ray.put(asdict(cfg)), "stop_at": stop_at}
        trainer = TorchTrainer(
            _ray_worker, train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=gpus > 0),
            run_config=ray.train.RunConfig(name="train", storage_path=storage,
                                           failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)))
        try:
            trainer.fit()
        except Exception as e:
            error = user_error(e)  # the worker's own error, out of Ray Train's wrappers
            if error is None:
                raise
            raise error from None
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    return _last_metrics(cfg)


def _last_metrics(cfg: TrainConfig) -> list[dict[str, Any]]:
    """The last metric line of each SAE, from the run folder (also when this call had nothing left to do)."""
    fs, root = filesystem(cfg.out, dict(cfg.storage_options))
    if not fs.exists(f"{root}/{METRICS}"):
        return []
    return read_metrics(fs, root)[-len(cfg.sae):]
