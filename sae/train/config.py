"""What a training run does (TrainConfig) and its schedules as functions of the step; default SAE names."""

from __future__ import annotations

import math
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
    lr: float | None = None
    """Adam learning rate after warm-up; default per SAE 2e-4 * sqrt(2**14 / d_sae) (Gao et al. 2024: the best
    rate falls as 1/sqrt(latents)), so that a small SAE also converges in a short run."""
    lr_warmup_steps: int | None = None
    """Linear warm-up from 0; default a twentieth of the run, at most 1000 steps."""
    lr_decay_frac: float = 0.2
    """Fraction of the run, at its end, over which lr decays linearly to 0."""
    sparsity_warmup_steps: int | None = None
    """Linear warm-up of the L1 (relu) / L0 (jumprelu) coefficient; default a twentieth of the run, at most 1000
    steps."""
    dead_window_tokens: int | None = None
    """A latent that has not fired for this many tokens is dead; default a tenth of the run (at least 4 steps'
    tokens), at most 2,000,000."""
    auxk_coeff: float = 1 / 32
    """Weight of the AuxK loss (topk kinds), as in Gao et al. 2024."""
    k_aux: int | None = None
    """Dead latents in the AuxK reconstruction; default d_in // 2."""
    resample_every: int | None = None
    """relu: every this many steps, until the lr decay starts (rows resampled later would go untrained and
    wreck the reconstruction), re-initialize dead latents toward badly reconstructed inputs; default a fifth
    of the run, at most 2500 steps; 0 never."""
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
        lows = {"tokens": 1, "batch_size": 1, "log_every": 1, "num_workers": 1, "max_failures": 0,
                "lr_warmup_steps": 0, "sparsity_warmup_steps": 0, "dead_window_tokens": 1, "resample_every": 0}
        for name, low in lows.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"TrainConfig: {name} must be >= {low}, got {value}")
        if not 0 <= self.lr_decay_frac <= 1 or (self.lr is not None and self.lr <= 0):
            raise ConfigError("TrainConfig: need lr > 0 and 0 <= lr_decay_frac <= 1")

    @property
    def tokens_per_step(self) -> int:
        """Patches of one step, all ranks together."""
        return self.batch_size * self.num_workers

    @property
    def steps(self) -> int:
        """Optimizer steps of the run: every rank takes one batch per step."""
        return max(1, self.tokens // self.tokens_per_step)

    # the schedules: a field's value when given, else scaled with the run (so a short run gets through them)
    @property
    def lr_warmup(self) -> int:
        """Steps of the lr warm-up."""
        return _given_or(self.lr_warmup_steps, min(1000, self.steps // 20))

    @property
    def sparsity_warmup(self) -> int:
        """Steps of the sparsity coefficient's warm-up."""
        return _given_or(self.sparsity_warmup_steps, min(1000, self.steps // 20))

    @property
    def dead_window(self) -> int:
        """Tokens without firing after which a latent is dead."""
        return _given_or(self.dead_window_tokens, min(2_000_000, max(4, self.steps // 10) * self.tokens_per_step))

    @property
    def resample_interval(self) -> int:
        """Steps between resamplings of dead relu latents (0: never)."""
        return _given_or(self.resample_every, min(2500, self.steps // 5))

    def resamples_at(self, step: int) -> bool:
        """Whether dead relu latents are resampled after `step` steps: every resample_interval, before the decay."""
        every = self.resample_interval
        return bool(every) and step % every == 0 and step < self.steps * (1 - self.lr_decay_frac)

    def peak_lr(self, d_sae: int) -> float:
        """The learning rate after warm-up of an SAE with d_sae latents."""
        return self.lr if self.lr is not None else 2e-4 * math.sqrt(2 ** 14 / d_sae)

    def lr_at(self, step: int, d_sae: int) -> float:
        """The learning rate of `step`: linear warm-up, constant, linear decay to 0 (the lower of the two ramps)."""
        up = (step + 1) / self.lr_warmup if step < self.lr_warmup else 1.0
        decay = self.steps * self.lr_decay_frac
        down = (self.steps - step) / decay if decay > 0 else 1.0
        return self.peak_lr(d_sae) * max(0.0, min(up, down, 1.0))

    def sparsity_scale_at(self, step: int) -> float:
        """The factor on the sparsity coefficient at `step`: a linear warm-up to 1."""
        warm = self.sparsity_warmup
        return min(1.0, (step + 1) / warm) if warm else 1.0

    def schedule_warnings(self) -> list[str]:
        """One line per schedule field given a value too long for this run (defaults scale with the run)."""
        steps, tokens = self.steps, self.steps * self.tokens_per_step
        kinds = {s.get("kind", "topk") for s in self.sae}
        checks = [  # field, the run's length in its unit, the share of it that is too much, what waits, if it applies
            ("lr_warmup_steps", steps, "step", 1 / 4, "lr reaches its peak only after it", True),
            ("sparsity_warmup_steps", steps, "step", 1 / 4, "the sparsity coefficient reaches its value only after it",
             bool(kinds & {"relu", "jumprelu"})),
            ("dead_window_tokens", tokens, "token", 1 / 4, "no latent counts as dead (AuxK, resampling) before it",
             True),
            ("resample_every", steps, "step", 1, "no dead latent is ever resampled", "relu" in kinds),
        ]
        return [f"{name}={getattr(self, name)} is {getattr(self, name) / length:.0%} of this {length}-{unit} run: "
                f"{effect}; leave it unset to scale it with the run"
                for name, length, unit, share, effect, applies in checks
                if applies and getattr(self, name) is not None and getattr(self, name) >= share * length]


def _given_or(value: int | None, scaled: int) -> int:
    return scaled if value is None else value


def sae_name(fields: Mapping[str, Any]) -> str:
    """A readable default name: kind, k or coefficient, expansion."""
    kind = fields.get("kind", "topk")
    size = f"x{fields['expansion']:g}" if "expansion" in fields else f"m{fields.get('d_sae', 'auto')}"
    knob = {**dict.fromkeys(("topk", "batchtopk", "matryoshka"), f"k{fields.get('k', 32)}"),
            "relu": f"l1-{fields.get('l1_coeff', 5.0):g}", "jumprelu": f"l0-{fields.get('l0_coeff', 1.0):g}"}
    return f"{kind}-{knob.get(kind, '')}-{size}"
