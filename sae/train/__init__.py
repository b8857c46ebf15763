"""The SAE trainer (DESIGN.md, "SAE"): one pass over a store's patches, several SAEs on the same batches.

    PatchLoader (normalized batches) -> for each SAE of the sweep:
        forward (+ AuxK for topk kinds) -> backward -> [all-reduce grads] -> remove the decoder
        gradient parallel to its rows -> clip -> Adam step -> unit-norm decoder rows
        -> dead-latent tracking (tokens since each latent last fired)

Schedules are functions of the step (lr: linear warm-up, constant, linear decay to 0; sparsity
coefficient: linear warm-up), so a resumed run needs only the step, the parameters, Adam's state,
the dead-latent counters and the loader's position: `<out>/checkpoint/` holds exactly those, and a
resumed run equals an uninterrupted one. Data parallelism (`num_workers > 1`) runs the same loop in
Ray Train workers: each rank reads its own chunks, gradients are averaged with one all-reduce per
SAE, and rank 0 logs and saves.

Outputs under `out` (a path or fsspec URL): train_config.json, metrics.jsonl (one line per SAE per
log step, appended), <name>/sae.safetensors + cfg.json per SAE (sae.checkpoint), checkpoint/.

Modules: config (TrainConfig, its schedules, default SAE names), trainer (Trainer: the loop,
checkpoints, resume), sinks (metrics.jsonl, TensorBoard, wandb), launch (`train`: one process or Ray Train).
"""

from sae.train.config import TrainConfig, sae_name
from sae.train.launch import train
from sae.train.trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "sae_name", "train"]
