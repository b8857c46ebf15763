"""SAEConfig: what an SAE is (shape, activation, sparsity penalty), validated on construction.

The trainer's own settings (learning rate, batch size, AuxK coefficient, ...) live in the
trainer's config; this one holds only what is needed to rebuild and run a trained SAE, and is
saved as `cfg.json` beside `sae.safetensors` (see sae.checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from actstore.errors import ConfigError

__all__ = ["DTYPES", "KINDS", "SAEConfig"]

KINDS = ("relu", "topk", "batchtopk", "jumprelu")
"""relu: ReLU + L1 penalty. topk: k latents per token. batchtopk: k * batch latents per batch
(a learned global threshold at inference). jumprelu: per-latent thresholds with an L0 penalty."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SAEConfig:
    """One sparse autoencoder. `d_sae` and `expansion` resolve each other: give either (or both, agreeing)."""

    d_in: int
    """Width of the input activations (the backbone's hidden size, e.g. 768)."""
    kind: str = field(default="topk", metadata={"choices": KINDS})
    """Activation and sparsity mechanism, one of KINDS."""
    d_sae: int | None = None
    """Number of latents; defaults to expansion * d_in."""
    expansion: float | None = None
    """d_sae / d_in; defaults to 16 when d_sae is not given either."""
    k: int = 32
    """Active latents per token (topk) or on average per token over a batch (batchtopk)."""
    l1_coeff: float = 5.0
    """relu: weight of the L1 penalty (mean over tokens of the summed activations). With unit-norm
    decoder rows this equals the decoder-norm-weighted L1 of Anthropic's formulation."""
    l0_coeff: float = 1.0
    """jumprelu: weight of the L0 penalty (mean over tokens of the active-latent count)."""
    jumprelu_init_threshold: float = 0.01
    """jumprelu: initial threshold of every latent (on normalized inputs, per-dimension scale ~1)."""
    jumprelu_bandwidth: float = 0.05
    """jumprelu: width of the rectangle kernel of the straight-through threshold gradient."""
    batchtopk_threshold_lr: float = 0.01
    """batchtopk: rate of the moving average of the smallest selected activation, the threshold
    used at inference (model.eval())."""
    dtype: str = field(default="float32", metadata={"choices": tuple(DTYPES)})
    """Parameter dtype, one of DTYPES."""
    init_seed: int = 0
    """Seed of the random decoder directions (W_enc starts as their copy)."""

    def __post_init__(self) -> None:
        if not isinstance(self.d_in, int) or self.d_in < 1:
            raise ConfigError(f"SAEConfig: d_in must be a positive integer, got {self.d_in!r}")
        if self.kind not in KINDS:
            raise ConfigError(f"SAEConfig: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "d_sae", parse_d_sae(self.d_in, self.d_sae, self.expansion))
        object.__setattr__(self, "expansion", self.d_sae / self.d_in)
        if self.kind in ("topk", "batchtopk") and not 1 <= self.k <= self.d_sae:
            raise ConfigError(f"SAEConfig: k must be in [1, d_sae={self.d_sae}], got {self.k}")
        for name in ("l1_coeff", "l0_coeff", "jumprelu_init_threshold"):
            if getattr(self, name) < 0:
                raise ConfigError(f"SAEConfig: {name} must be >= 0, got {getattr(self, name)}")
        if self.jumprelu_bandwidth <= 0:
            raise ConfigError(f"SAEConfig: jumprelu_bandwidth must be > 0, got {self.jumprelu_bandwidth}")
        if not 0 < self.batchtopk_threshold_lr <= 1:
            raise ConfigError(f"SAEConfig: batchtopk_threshold_lr must be in (0, 1], got {self.batchtopk_threshold_lr}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"SAEConfig: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def sparse(self) -> bool:
        """Whether the latents come out as SparseActs (topk kinds) rather than a dense tensor."""
        return self.kind in ("topk", "batchtopk")


def parse_d_sae(d_in: int, d_sae: int | None, expansion: float | None) -> int:
    """The number of latents from d_sae and/or expansion (16 when neither is given)."""
    if d_sae is None:
        if expansion is None:
            expansion = 16
        if expansion <= 0:
            raise ConfigError(f"SAEConfig: expansion must be > 0, got {expansion}")
        return max(1, round(expansion * d_in))
    if not isinstance(d_sae, int) or d_sae < 1:
        raise ConfigError(f"SAEConfig: d_sae must be a positive integer, got {d_sae!r}")
    if expansion is not None and round(expansion * d_in) != d_sae:
        raise ConfigError(f"SAEConfig: d_sae={d_sae} disagrees with expansion={expansion} * d_in={d_in}; give one")
    return d_sae
