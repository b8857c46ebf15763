"""The SAE trainer (DESIGN.md, "SAE"): one pass over a store's patches, several SAEs on the same batches.

    PatchLoader (normalized batches) -> for each SAE of the sweep:
        forward (+ AuxK for topk kinds) -> backward -> [all-reduce grads] -> remove the decoder
        gradient parallel to its rows -> clip -> Adam step -> unit-norm decoder rows
        -> dead-latent tracking (tokens since each latent last fired)

Schedules are functions of the step (lr: linear warm-up, constant, linear decay to 0; sparsity
coefficient: linear warm-up), so a resumed run needs only the step, the parameters, Adam's state,
the dead-latent and log-interval counters and every rank's loader position, and a resumed run equals an
uninterrupted one (bitwise, on the same hardware and worker count). `<out>/checkpoint/` holds exactly those:

    checkpoint/step-<step>/<sae>.safetensors   per SAE: model.* (parameters, buffers), adam.* (moments,
                                               step), since_fired, interval_fires, interval_tokens
    checkpoint/state.json                      format, step, tensors (the step folder it names), loaders
                                               (one loader state per rank), members, resumed_from (the
                                               steps this run was resumed at), config

A checkpoint writes a new step folder, then state.json (written whole, last: a run killed at any point
resumes from a complete checkpoint, never from tensors of one step and positions of another), then the
SAEs' <name>/sae.safetensors, then removes the older step-<n> folders (nothing else in checkpoint/). A
run folder with a checkpoint is resumed by the same config; log_every, checkpoint_every, tensorboard,
wandb_project, out (a moved folder) and storage_options (rotated keys) may differ, num_workers may not
(ConfigError: each rank's loader position is saved).

Data parallelism (`num_workers > 1`) runs the same loop in Ray Train workers: each rank reads its own
chunks, gradients are averaged with one all-reduce per SAE, every checkpoint gathers the ranks' loader
positions to rank 0, and rank 0 logs and saves. Failures: Ray Train restarts the worker group up to
TrainConfig.max_failures (3) times after a worker error (a killed process, out of memory, a lost node; node
preemptions have Ray's own budget), and the restarted workers resume from checkpoint/state.json; so
does a later `train` call with the same config. The sweep's and the run folder's checks are made
before any worker starts; an error raised in a worker is retried like any worker error, then raised as
itself (actstore.errors.user_error takes it out of Ray Train's wrappers). Ray
Train's own files (no checkpoints) go to a temporary folder on the driver's node, removed afterwards.
`train(cfg, stop_after=n)` stops n steps after where it starts, checkpointing there.

Modules: config (TrainConfig, its schedules, default SAE names), trainer (Trainer: the loop,
checkpoints, resume), sinks (metrics.jsonl, TensorBoard, wandb), launch (`train`: one process or Ray Train).
"""

from sae.train.config import TrainConfig, sae_name
from sae.train.launch import train
from sae.train.trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "sae_name", "train"]
