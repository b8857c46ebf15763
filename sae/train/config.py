"""What a training run does (TrainConfig) and its schedules as functions of the step; default SAE names."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from actstore.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    """One training run (a sweep of SAEs on the same batches); written to <out>/train_config.json."""

    store: str
    """Activation store URL."""
    out: str
    """Output directory (path or fsspec URL)."""
    layer: str | int = -2
    """Store layer: name, block index, or negative block index."""
    sae: tuple[Mapping[str, Any], ...] = ({"kind": "topk", "k": 32, "expansion": 16},)
    """The sweep: SAEConfig fields per SAE (d_in comes from the store); optional "name"."""
    tokens: int = 10_000_000
    """Training tokens (patches), all ranks together; the loader cycles epochs as needed."""
    batch_size: int = 4096
    """Patches per step and rank."""
    lr: float = 2e-4
    """Adam learning rate after warm-up."""
    lr_warmup_steps: int = 1000
    """Linear warm-up from 0 (capped at a tenth of the run)."""
    lr_decay_frac: float = 0.2
    """Fraction of the run, at its end, over which lr decays linearly to 0."""
    sparsity_warmup_steps: int = 1000
    """Linear warm-up of the L1 (relu) / L0 (jumprelu) coefficient (capped at a twentieth of the run)."""
    dead_window_tokens: int = 2_000_000
    """A latent that has not fired for this many tokens is dead."""
    auxk_coeff: float = 1 / 32
    """Weight of the AuxK loss (topk kinds), as in Gao et al. 2024."""
    k_aux: int | None = None
    """Dead latents in the AuxK reconstruction; default d_in // 2."""
    resample_every: int | None = 2500
    """relu: every this many steps, re-initialize dead latents toward badly reconstructed inputs."""
    grad_clip: float = 1.0
    """Max global gradient norm per SAE (0 disables)."""
    normalize: bool = True
    """Train on the loader's normalized activations (recorded in every checkpoint)."""
    buffer_bytes: int | None = None
    """Loader shuffle buffer; default the loader's."""
    seed: int = 0
    """Loader order and resampling draws."""
    amp: bool = True
    """bfloat16 autocast for the forward pass on CUDA (ignored on CPU)."""
    log_every: int = 50
    """Steps between metric lines."""
    checkpoint_every: int | None = 1000
    """Steps between resumable checkpoints (and at the end); None: only at the end."""
    num_workers: int = 1
    """Data-parallel workers through Ray Train (GPUs when the cluster has them)."""
    address: str | None = None
    """Ray cluster address for num_workers > 1; default RAY_ADDRESS, else a local Ray."""
    max_failures: int = 3
    """num_workers > 1: Ray Train restarts the worker group this many times after a worker error (a process
    killed, out of memory, a lost node), each restart resuming from the last checkpoint; 0 fails at once."""
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    """fsspec options for the store and for out."""
    tensorboard: bool = False
    """Also write TensorBoard events under <out>/tb (needs tensorboard installed)."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (needs wandb installed)."""

    def __post_init__(self) -> None:
        if isinstance(self.sae, Mapping):
            object.__setattr__(self, "sae", (self.sae,))
        object.__setattr__(self, "sae", tuple(dict(s) for s in self.sae))
        if not self.sae:
            raise ConfigError("TrainConfig: the sweep needs at least one SAE")
        names = [s.get("name") or sae_name(s) for s in self.sae]
        if len(set(names)) != len(names):
            raise ConfigError(f"TrainConfig: SAE names collide ({names}); give each a distinct 'name'")
        if self.max_failures < 0:
            raise ConfigError(f"max_failures must be >= 0, got {self.max_failures}")
        for name in ("tokens", "batch_size", "log_every", "num_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.lr_decay_frac <= 1 or self.lr <= 0:
            raise ConfigError("TrainConfig: need lr > 0 and 0 <= lr_decay_frac <= 1")

    @property
    def steps(self) -> int:
        """Optimizer steps of the run: every rank takes one batch per step."""
        return max(1, self.tokens // (self.batch_size * self.num_workers))

    def lr_at(self, step: int) -> float:
        """The learning rate of `step`: linear warm-up, constant, linear decay to 0."""
        warm = min(self.lr_warmup_steps, self.steps // 10)
        if step < warm:
            return self.lr * (step + 1) / warm
        decay_start = self.steps * (1 - self.lr_decay_frac)
        if step >= decay_start and self.lr_decay_frac > 0:
            return self.lr * max(0.0, (self.steps - step) / (self.steps - decay_start))
        return self.lr

    def sparsity_scale_at(self, step: int) -> float:
        """The factor on the sparsity coefficient at `step`: a linear warm-up to 1."""
        warm = min(self.sparsity_warmup_steps, self.steps // 20)
        return min(1.0, (step + 1) / warm) if warm else 1.0


def sae_name(fields: Mapping[str, Any]) -> str:
    """A readable default name: kind, k or coefficient, expansion."""
    kind = fields.get("kind", "topk")
    size = f"x{fields['expansion']:g}" if "expansion" in fields else f"m{fields.get('d_sae', 'auto')}"
    knob = {"topk": f"k{fields.get('k', 32)}", "batchtopk": f"k{fields.get('k', 32)}",
            "relu": f"l1-{fields.get('l1_coeff', 5.0):g}", "jumprelu": f"l0-{fields.get('l0_coeff', 1.0):g}"}
    return f"{kind}-{knob.get(kind, '')}-{size}"
