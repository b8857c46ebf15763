"""TopK decode as a gather-accumulate over the active decoder rows, and its sparse backward.

x_hat[b] = b_dec + sum over b's entries n of values[n] * W_dec[indices[n]], W_dec of shape
(d_sae, d_in): B * k * d multiply-adds instead of the dense (B x d_sae) @ (d_sae x d_in) GEMM.

Backward, never dense in (B x d_sae) either:
- grad_values[n] = <grad_out[row n], W_dec[indices[n]]>                (backend.gather_dot)
- grad_W_dec[m]  = sum over entries n with indices[n] == m of values[n] * grad_out[row n]
                                                                        (scatter_acc below)
- grad_b_dec     = grad_out summed over the batch.

`scatter_acc` is the transposed gather: sort the entries by latent (CSR -> CSC) and run the same
gather-accumulate with the roles of rows and latents swapped. It is deterministic (no atomics)
and serves the encoder's weight gradient too (sae.kernels.encoder).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from sae.acts import csr_offsets, csr_rows

__all__ = ["SparseDecode", "by_latent", "scatter_acc"]


def by_latent(indices: torch.Tensor, n_latents: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets): entries sorted by latent (stable) and where each latent's entries start."""
    return torch.argsort(indices, stable=True), csr_offsets(indices, n_latents)


def scatter_acc(backend: ModuleType, values: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor,
                x: torch.Tensor, n_latents: int) -> torch.Tensor:
    """(n_latents, d): out[m] = sum over entries n with indices[n] == m of values[n] * x[rows[n]]."""
    order, offsets = by_latent(indices, n_latents)
    return backend.gather_acc(values[order], rows[order], offsets, x)


class SparseDecode(torch.autograd.Function):
    """(values, indices, offsets, W_dec, b_dec or None, backend) -> x_hat (B, d_in)."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, backend: ModuleType) -> torch.Tensor:
        out = backend.gather_acc(values, indices, offsets, weight)
        if bias is not None:
            out += bias
        ctx.save_for_backward(values, indices, offsets, weight)
        ctx.backend = backend
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        values, indices, offsets, weight = ctx.saved_tensors
        backend = ctx.backend
        need_values, _, _, need_weight, need_bias, _ = ctx.needs_input_grad
        grad = grad.contiguous()
        rows = csr_rows(offsets, indices.numel())
        grad_values = backend.gather_dot(grad, weight, indices, offsets, rows) if need_values else None
        grad_weight = scatter_acc(backend, values, indices, rows, grad, weight.shape[0]) if need_weight else None
        grad_bias = grad.sum(0) if need_bias and ctx.has_bias else None
        return grad_values, None, None, grad_weight, grad_bias, None
