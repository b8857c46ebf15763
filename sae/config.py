"""SAEConfig: what an SAE is (shape, activation, sparsity penalty), validated on construction.

The trainer's own settings (learning rate, batch size, AuxK coefficient, ...) live in the
trainer's config; this one holds only what is needed to rebuild and run a trained SAE, and is
saved as `cfg.json` beside `sae.safetensors` (see sae.checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate

import torch

from actstore.errors import ConfigError

__all__ = ["DTYPES", "KINDS", "SAEConfig", "default_group_sizes"]

KINDS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")
"""relu: ReLU + L1 penalty. topk: k latents per token. batchtopk: k * batch latents per batch
(a learned global threshold at inference). jumprelu: per-latent thresholds with an L0 penalty.
matryoshka: batchtopk latents trained so that every prefix of nested groups (group_sizes)
reconstructs on its own (Bussmann et al. 2025), which puts general features first."""
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
    """Active latents per token (topk) or on average per token over a batch (batchtopk, matryoshka)."""
    l1_coeff: float = 5.0
    """relu: weight of the L1 penalty (mean over tokens of the summed activations). With unit-norm
    decoder rows this equals the decoder-norm-weighted L1 of Anthropic's formulation."""
    l0_coeff: float = 1.0
    """jumprelu: weight of the L0 penalty (mean over tokens of the active-latent count): a latent is worth
    its firing where it lowers the token's squared error (summed over d_in) by more than this."""
    jumprelu_init_threshold: float = 1.0
    """jumprelu: initial threshold of every latent. On normalized inputs (unit rms per dimension) the
    pre-activations start about N(0, 1), so 1.0 lets about a sixth of the latents fire at first (0.01 let half
    fire: a dense start that a short run never left)."""
    jumprelu_bandwidth: float = 0.5
    """jumprelu: width of the rectangle kernel of the straight-through threshold gradient, in pre-activation
    units (half their starting standard deviation): narrower kernels see few tokens of a sparse latent per batch."""
    batchtopk_threshold_lr: float = 0.01
    """batchtopk, matryoshka: rate of the moving average of the smallest selected activation, the
    threshold used at inference (model.eval())."""
    group_sizes: tuple[int, ...] | None = None
    """matryoshka: sizes of the nested latent groups, summing to d_sae (prefix j = groups 0..j);
    defaults to prefixes at d_sae // 16, // 8, // 4, // 2 and d_sae (see default_group_sizes)."""
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
        if self.sparse and not 1 <= self.k <= self.d_sae:
            raise ConfigError(f"SAEConfig: k must be in [1, d_sae={self.d_sae}], got {self.k}")
        for name in ("l1_coeff", "l0_coeff", "jumprelu_init_threshold"):
            if getattr(self, name) < 0:
                raise ConfigError(f"SAEConfig: {name} must be >= 0, got {getattr(self, name)}")
        if self.jumprelu_bandwidth <= 0:
            raise ConfigError(f"SAEConfig: jumprelu_bandwidth must be > 0, got {self.jumprelu_bandwidth}")
        if not 0 < self.batchtopk_threshold_lr <= 1:
            raise ConfigError(f"SAEConfig: batchtopk_threshold_lr must be in (0, 1], got {self.batchtopk_threshold_lr}")
        self._resolve_group_sizes()
        if self.dtype not in DTYPES:
            raise ConfigError(f"SAEConfig: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    def _resolve_group_sizes(self) -> None:
        """Default and validate group_sizes; a list (from cfg.json or TOML) becomes a tuple."""
        if self.kind != "matryoshka":
            if self.group_sizes is not None:
                raise ConfigError(f"SAEConfig: group_sizes is for kind 'matryoshka' only, not {self.kind!r}")
            return
        sizes = default_group_sizes(self.d_sae) if self.group_sizes is None else self.group_sizes
        if (not isinstance(sizes, (list, tuple)) or not sizes
                or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in sizes)):
            raise ConfigError(f"SAEConfig: group_sizes must be positive integers, got {self.group_sizes!r}")
        sizes = tuple(sizes)
        if sum(sizes) != self.d_sae:
            raise ConfigError(f"SAEConfig: group_sizes must sum to d_sae={self.d_sae}, got sum {sum(sizes)}")
        object.__setattr__(self, "group_sizes", sizes)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def sparse(self) -> bool:
        """Whether the latents come out as SparseActs (topk, batchtopk, matryoshka) rather than a dense tensor."""
        return self.kind in ("topk", "batchtopk", "matryoshka")

    @property
    def batch_topk(self) -> bool:
        """Whether the latents are BatchTopK's, with a learned global threshold at inference."""
        return self.kind in ("batchtopk", "matryoshka")

    @property
    def prefix_ends(self) -> tuple[int, ...]:
        """matryoshka: the end of each nested prefix (cumulative group_sizes; SAELens's matryoshka_widths)."""
        return tuple(accumulate(self.group_sizes or ()))


def default_group_sizes(d_sae: int) -> tuple[int, ...]:
    """Nested groups ending at d_sae // 16, // 8, // 4, // 2 and d_sae (geometric, as in Bussmann et
    al. 2025's practice): a small first group for the most general features; repeated ends of a
    small d_sae merge."""
    ends = sorted({max(1, d_sae >> shift) for shift in range(5)})
    return tuple(b - a for a, b in zip([0, *ends], ends))


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
