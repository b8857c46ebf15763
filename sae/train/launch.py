"""Running a TrainConfig: in this process, or data-parallel in Ray Train workers (one Trainer per rank)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from actstore.cluster import init_ray
from actstore.store import filesystem
from sae.train.config import TrainConfig
from sae.train.sinks import read_metrics
from sae.train.trainer import Trainer


def _ray_worker(config: dict[str, Any]) -> None:
    import ray.train

    ctx = ray.train.get_context()
    cfg = TrainConfig(**config)
    Trainer(cfg, ctx.get_world_rank(), ctx.get_world_size()).fit(progress=ctx.get_world_rank() == 0)


def train(cfg: TrainConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Run a training config: in this process, or data-parallel through Ray Train; returns the last metrics."""
    if cfg.num_workers == 1:
        return Trainer(cfg).fit(progress=progress)
    import ray  # imported here: Ray takes seconds to import and single-process runs never need it
    import ray.train
    from ray.train.torch import TorchTrainer

    init_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    trainer = TorchTrainer(_ray_worker, train_loop_config=asdict(cfg),
                           scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=gpus > 0))
    trainer.fit()
    fs, root = filesystem(cfg.out, dict(cfg.storage_options))
    return read_metrics(fs, root)[-len(cfg.sae):]
