"""Reconstruction and sparsity metrics of an SAE on a batch, and the per-latent firing statistics.

Definitions (x, x_hat: (B, d); acts: dense (B, d_sae) or SparseActs; a latent "fires" on a token
when its activation is nonzero):

- mse            mean over elements of (x - x_hat)^2
- sse_per_token  mean over tokens of sum over d of (x - x_hat)^2 (the training loss's "mse" term)
- fvu            sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, the batch mean (fraction of
                 variance unexplained; 1.0 for x_hat = the batch mean)
- l0             mean over tokens of the number of latents that fire
- l1             mean over tokens of sum |activation|
- firing_counts  per latent, the number of tokens it fires on (int64, summable over a window)
- dead_fraction  fraction of latents with zero firings (over whatever window the counts cover)
- dense_fraction fraction of latents firing on more than `threshold` of the tokens (default 10%)

Scalar metrics come back as Python floats (one host sync per call); counts stay tensors on the
device so the trainer can add them up over its window without syncing.
"""

from __future__ import annotations

import torch

from sae.acts import SparseActs

__all__ = ["batch_metrics", "dead_fraction", "dense_fraction", "firing_counts", "firing_frequency", "fvu", "l0",
           "l1", "mse", "sse_per_token"]


def _squared_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return (x.double() - x_hat.double()).square()


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return _squared_error(x, x_hat).mean().item()


def sse_per_token(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return _squared_error(x, x_hat).sum(-1).mean().item()


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x64 = x.double()
    total = (x64 - x64.mean(0)).square().sum()
    return (_squared_error(x, x_hat).sum() / total).item()


def _values(acts: torch.Tensor | SparseActs) -> torch.Tensor:
    return acts.values if isinstance(acts, SparseActs) else acts


def _n_tokens(acts: torch.Tensor | SparseActs) -> int:
    return acts.n_tokens if isinstance(acts, SparseActs) else acts.shape[0]


def l0(acts: torch.Tensor | SparseActs) -> float:
    return ((_values(acts) != 0).sum().double() / _n_tokens(acts)).item()


def l1(acts: torch.Tensor | SparseActs) -> float:
    return (_values(acts).double().abs().sum() / _n_tokens(acts)).item()


def firing_counts(acts: torch.Tensor | SparseActs) -> torch.Tensor:
    """(d_sae,) int64: on how many of the batch's tokens each latent fires."""
    if isinstance(acts, SparseActs):
        fired = acts.indices[acts.values != 0]
        return torch.bincount(fired, minlength=acts.d_sae)
    return (acts != 0).sum(0)


def firing_frequency(counts: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """(d_sae,) float64: fraction of the tokens each latent fires on."""
    return counts.double() / max(n_tokens, 1)


def dead_fraction(counts: torch.Tensor) -> float:
    return (counts == 0).double().mean().item()


def dense_fraction(counts: torch.Tensor, n_tokens: int, threshold: float = 0.1) -> float:
    return (firing_frequency(counts, n_tokens) > threshold).double().mean().item()


def batch_metrics(x: torch.Tensor, x_hat: torch.Tensor, acts: torch.Tensor | SparseActs) -> dict[str, float]:
    """mse, sse_per_token, fvu, l0, l1 and (this batch's) dead and dense fractions, with one host sync."""
    err = _squared_error(x, x_hat)
    x64 = x.double()
    values, n = _values(acts), _n_tokens(acts)
    freq = firing_frequency(firing_counts(acts), n)
    stacked = torch.stack([t.double() for t in (
        err.mean(), err.sum(-1).mean(), err.sum() / (x64 - x64.mean(0)).square().sum(),
        (values != 0).sum().double() / n, values.double().abs().sum() / n,
        (freq == 0).double().mean(), (freq > 0.1).double().mean(),
    )])
    names = ("mse", "sse_per_token", "fvu", "l0", "l1", "dead_fraction", "dense_fraction")
    return dict(zip(names, stacked.tolist()))
