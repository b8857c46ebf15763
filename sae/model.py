"""SparseAutoencoder: ReLU + L1, TopK, BatchTopK, JumpReLU and Matryoshka SAEs behind one module.

    pre   = (x - b_dec) @ W_enc.T + b_enc          W_enc: (d_sae, d_in), b_enc: (d_sae,)
    f     = activation(pre)                         relu | topk | batchtopk (matryoshka) | jumprelu
    x_hat = f @ W_dec + b_dec                       W_dec: (d_sae, d_in), b_dec: (d_in,)

Both weight matrices hold one row per latent, so that the sparse kernels gather and scatter whole
rows (sae.kernels). In SAELens's layout W_enc is the transpose, (d_in, d_sae): see sae.checkpoint.

The decoder rows are kept at unit norm: the trainer calls `remove_parallel_grad()` after
backward (so that the optimizer step does not mostly grow the norm) and
`set_decoder_norm_to_unit()` after the optimizer step. With unit rows, ReLU's L1 penalty equals
the decoder-norm-weighted L1 of Anthropic's formulation, and the JumpReLU thresholds keep their
meaning across steps.

JumpReLU trains its thresholds directly (used as relu(threshold)), not through log(threshold) as
in the paper: under Adam a log parameter moves a small threshold by only ~threshold * lr per
step. The L0 penalty reaches the thresholds alone (the paper's straight-through estimator), so the
trainer steps them at lr * sqrt(d_in), the pace at which the encoder moves the pre-activations they
gate (sae.train.trainer.param_groups); at lr they could not move far enough for l0_coeff to matter. BatchTopK, in training mode, updates its inference
threshold on every forward/encode; model.eval() switches it to that threshold.

Matryoshka (Bussmann et al. 2025) encodes exactly as BatchTopK (same threshold buffer) and only
changes the loss: the sum over the nested prefixes j of the squared error of the reconstruction
from latents [0, prefix_ends[j]) alone, so that the first groups learn to stand on their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from actstore.errors import ConfigError
from sae.acts import SparseActs, csr_offsets
from sae.config import SAEConfig
from sae.kernels import dense_encode, sparse_decode, sparse_encode

__all__ = ["ForwardOutput", "SparseAutoencoder", "geometric_median"]


@dataclass
class ForwardOutput:
    x_hat: torch.Tensor
    """(B, d_in) reconstruction, in the parameters' dtype."""
    acts: torch.Tensor | SparseActs
    """Latents: dense (B, d_sae) for relu/jumprelu, SparseActs for topk/batchtopk/matryoshka."""
    losses: dict[str, torch.Tensor]
    """Unweighted float32 loss terms: "mse" (squared error summed over d_in, mean over tokens, of the
    full reconstruction), plus "l1" (relu: summed activations, mean over tokens), "l0" (jumprelu:
    active count, mean over tokens, with a straight-through gradient for the thresholds) or
    "matryoshka" (the mse of every prefix reconstruction, summed; the last one is "mse")."""
    loss: torch.Tensor
    """mse + sparsity_coeff * the sparsity term (topk, batchtopk: mse alone; matryoshka: the
    "matryoshka" term); AuxK is separate."""


class SparseAutoencoder(nn.Module):
    """One SAE of any kind (cfg.kind); see the module docstring for the parameters' layout."""

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        dtype, d_sae, d_in = cfg.torch_dtype, cfg.d_sae, cfg.d_in
        generator = torch.Generator().manual_seed(cfg.init_seed)
        directions = torch.randn(d_sae, d_in, generator=generator, dtype=torch.float64)
        directions /= directions.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(directions.to(device=device, dtype=dtype))
        self.W_enc = nn.Parameter(self.W_dec.detach().clone())  # W_enc = W_dec^T in the (d_in, d_sae) layout
        self.b_enc = nn.Parameter(torch.zeros(d_sae, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device, dtype=dtype))
        if cfg.kind == "jumprelu":
            self.threshold = nn.Parameter(torch.full((d_sae,), cfg.jumprelu_init_threshold, device=device, dtype=dtype))
        if cfg.batch_topk:
            # NaN until the first training batch; float64 as the moving average is slow to settle
            self.register_buffer("batchtopk_threshold", torch.tensor(float("nan"), dtype=torch.float64, device=device))
        if cfg.kind == "matryoshka":  # derived from cfg: not saved with the weights
            self.register_buffer("prefix_ends", torch.tensor(cfg.prefix_ends, device=device), persistent=False)

    # forward ----------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor | SparseActs:
        """Latents of x (B, d_in): dense (B, d_sae) for relu/jumprelu, SparseActs for the sparse kinds."""
        return self._encode(x)[0]

    def decode(self, acts: torch.Tensor | SparseActs) -> torch.Tensor:
        """Reconstruction from latents as `encode` returns them."""
        if isinstance(acts, SparseActs):
            return sparse_decode(acts, self.W_dec, self.b_dec)
        return torch.addmm(self.b_dec, acts, self.W_dec)

    def forward(self, x: torch.Tensor, sparsity_coeff: float | None = None) -> ForwardOutput:
        """Reconstruct x and compute the loss terms; sparsity_coeff overrides cfg.l1_coeff / cfg.l0_coeff
        (the trainer's warm-up schedule)."""
        x = x.to(self.W_enc.dtype)
        acts, l0 = self._encode(x)
        if self.cfg.kind == "matryoshka":
            prefixes = self.prefix_reconstructions(acts)
            prefix_mse = (prefixes - x.float()).square().sum(-1).mean(-1)
            losses = {"mse": prefix_mse[-1], "matryoshka": prefix_mse.sum()}
            return ForwardOutput(prefixes[-1].to(x.dtype), acts, losses, losses["matryoshka"])
        x_hat = self.decode(acts)
        mse = (x_hat.float() - x.float()).square().sum(-1).mean()
        losses = {"mse": mse}
        loss = mse
        if self.cfg.kind == "relu":
            losses["l1"] = acts.sum(-1, dtype=torch.float32).mean()  # acts >= 0: no abs needed
            loss = mse + (self.cfg.l1_coeff if sparsity_coeff is None else sparsity_coeff) * losses["l1"]
        elif self.cfg.kind == "jumprelu":
            losses["l0"] = l0.mean()
            loss = mse + (self.cfg.l0_coeff if sparsity_coeff is None else sparsity_coeff) * losses["l0"]
        return ForwardOutput(x_hat, acts, losses, loss)

    def prefix_reconstructions(self, acts: SparseActs) -> torch.Tensor:
        """(n_groups, B, d_in) float32, matryoshka: row j decodes only the latents below prefix_ends[j], + b_dec.

        The entries are sorted by group (stably, so rows stay ascending within a group) into one CSR
        of n_groups * B rows, so that a single sparse decode gives every group's partial
        reconstruction, for the work of one decode; their cumulative sum gives the prefixes.
        """
        n_groups, n_tokens = self.prefix_ends.numel(), acts.n_tokens
        group = torch.bucketize(acts.indices, self.prefix_ends, right=True)
        order = torch.argsort(group, stable=True)
        keys = (group * n_tokens + acts.rows())[order]
        by_group = SparseActs(acts.values[order], acts.indices[order], csr_offsets(keys, n_groups * n_tokens),
                              self.cfg.d_sae)
        partials = sparse_decode(by_group, self.W_dec).float().view(n_groups, n_tokens, -1)
        return partials.cumsum(0) + self.b_dec.float()

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor | SparseActs, torch.Tensor | None]:
        x = x.to(self.W_enc.dtype)
        cfg = self.cfg
        if cfg.kind == "relu":
            return dense_encode(x, self.W_enc, self.b_enc, self.b_dec)
        if cfg.kind == "jumprelu":
            return dense_encode(x, self.W_enc, self.b_enc, self.b_dec, self.threshold.relu(), cfg.jumprelu_bandwidth)
        if cfg.kind == "topk":
            return sparse_encode(x, self.W_enc, self.b_enc, self.b_dec, cfg.k), None
        if self.training or torch.isnan(self.batchtopk_threshold).item():
            acts = sparse_encode(x, self.W_enc, self.b_enc, self.b_dec, cfg.k, batch=True)
            if self.training:
                self._update_batchtopk_threshold(acts.values)
            return acts, None
        return self._threshold_batchtopk(x), None

    @torch.no_grad()
    def _update_batchtopk_threshold(self, values: torch.Tensor) -> None:
        """Moving average of the smallest positive selected activation (Bussmann et al. 2024), without a host sync."""
        smallest = torch.where(values > 0, values, torch.inf).min().double()
        lr, current = self.cfg.batchtopk_threshold_lr, self.batchtopk_threshold
        update = torch.where(torch.isnan(current), smallest, (1 - lr) * current + lr * smallest)
        self.batchtopk_threshold.copy_(torch.where(torch.isfinite(smallest), update, current))

    def _threshold_batchtopk(self, x: torch.Tensor) -> SparseActs:
        """BatchTopK at inference: a JumpReLU with the learned global threshold, as CSR."""
        threshold = self.batchtopk_threshold.to(self.W_enc.dtype).expand(self.cfg.d_sae)
        dense, _ = dense_encode(x, self.W_enc, self.b_enc, self.b_dec, threshold)
        rows, indices = (dense > 0).nonzero(as_tuple=True)  # row-major
        return SparseActs(dense[rows, indices], indices, csr_offsets(rows, dense.shape[0]), self.cfg.d_sae)

    # dead latents -----------------------------------------------------------------------------

    def auxk_loss(self, x: torch.Tensor, x_hat: torch.Tensor, dead_mask: torch.Tensor, k_aux: int) -> torch.Tensor:
        """AuxK loss (Gao et al. 2024, appendix A.2): the top-k_aux dead latents reconstruct the residual.

        e = x - x_hat (detached); e_hat = W_dec-decode of the ReLU'd top-min(k_aux, n_dead)
        pre-activations among the dead latents (no b_dec: it is already in x_hat); returns
        sum ||e - e_hat||^2 / sum ||e - mean(e)||^2 (float32; 0 when no latent is dead). The
        pre-activations are recomputed for the dead latents only (a B x n_dead x d_in GEMM), so
        the forward pass does not keep the dense (B x d_sae) matrix. The trainer weights it
        (1/32 in the paper) and picks k_aux (d_in / 2 there).
        """
        if dead_mask.shape != (self.cfg.d_sae,):
            raise ConfigError(f"auxk_loss: dead_mask must have shape ({self.cfg.d_sae},), got {tuple(dead_mask.shape)}")
        dead = dead_mask.nonzero().squeeze(1)
        if dead.numel() == 0:
            return x_hat.new_zeros((), dtype=torch.float32)
        x = x.to(self.W_enc.dtype)
        local = sparse_encode(x, self.W_enc[dead], self.b_enc[dead], self.b_dec, min(k_aux, dead.numel()))
        acts = SparseActs(local.values, dead[local.indices], local.offsets, self.cfg.d_sae)
        e_hat = sparse_decode(acts, self.W_dec).float()
        e = (x.float() - x_hat.float()).detach()
        return (e_hat - e).square().sum() / (e - e.mean(0)).square().sum().clamp_min(torch.finfo(torch.float32).tiny)

    # initialization and the decoder-norm constraint ------------------------------------------

    @torch.no_grad()
    def init_from_data(self, sample: torch.Tensor, method: str = "geometric_median") -> None:
        """Set b_dec to the geometric median (or "mean") of a sample of inputs (n, d_in).

        The geometric median is robust to the heavy-tailed channels of ViT activations, which
        would drag the mean; b_dec starts at the data's center so that the latents first see
        centered inputs.
        """
        if sample.ndim != 2 or sample.shape[1] != self.cfg.d_in or sample.shape[0] == 0:
            raise ConfigError(f"init_from_data: sample must have shape (n >= 1, {self.cfg.d_in}), "
                              f"got {tuple(sample.shape)}")
        if method == "geometric_median":
            center = geometric_median(sample)
        elif method == "mean":
            center = sample.double().mean(0)
        else:
            raise ConfigError(f"init_from_data: method must be 'geometric_median' or 'mean', got {method!r}")
        self.b_dec.copy_(center.to(self.b_dec.dtype))

    @torch.no_grad()
    def set_decoder_norm_to_unit(self) -> None:
        """Scale every decoder row to unit norm (the trainer calls this after each optimizer step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).tiny))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out of W_dec.grad each row's component along that row (call after backward).

        For unit rows w and gradient g this leaves g - <g, w> w, tangent to the sphere, so that
        the step changes the direction rather than the norm that set_decoder_norm_to_unit would undo.
        """
        grad = self.W_dec.grad
        if grad is None:
            return
        w = self.W_dec
        along = torch.einsum("md,md->m", grad, w) / w.norm(dim=1).square().clamp_min(torch.finfo(w.dtype).tiny)
        grad.addcmul_(w, along.unsqueeze(1), value=-1)


def geometric_median(points: torch.Tensor, n_iter: int = 100, tol: float = 1e-7, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld's algorithm from the mean, in float64; stops when a step moves less than tol * (1 + |y|).

    Each step is the mean of the points weighted by 1 / max(distance, eps): the eps keeps a point
    that coincides with the estimate from taking all the weight.
    """
    x = points.double()
    y = x.mean(0)
    for _ in range(n_iter):
        weights = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * x).sum(0) / weights.sum()
        moved = (new - y).norm()
        y = new
        if moved <= tol * (1 + y.norm()):
            break
    return y
