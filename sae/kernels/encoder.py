"""The encoder: pre = (x - b_dec) @ W_enc.T + b_enc, then the activation, with hand-written backwards.

`SparseEncode` (topk, batchtopk) selects k latents per token, or k * B over the batch, from the
dense pre-activations (that forward GEMM is unavoidable) and keeps only the selection. Its
backward touches the active latents only (N = B * k entries):
- grad_b_enc = index_add of the entries' gradients;
- grad_W_enc[m] = sum over entries n of latent m of grad[n] * x_in[row n]   (scatter_acc);
- grad_x = per token, sum of grad[n] * W_enc[indices[n]]                   (backend.gather_acc);
B * k * d multiply-adds each, where autograd through a dense (B x d_sae) gradient costs two
B * d_sae * d GEMMs (51 GFLOP each at 4096 x 16384 x 768).

`DenseEncode` (relu, jumprelu) is the dense path (the activations are dense-ish), with the bias and
activation fused (backend.linear_act) and the JumpReLU threshold trained by the straight-through
estimator of Rajamanoharan et al. (2024).

Both take b_dec and return its gradient as -(grad_b_enc @ W_enc): the sum over the batch of
d pre / d x_in, without the (B x d_sae) @ (d_sae x d) GEMM that autograd would run for x - b_dec.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from sae.acts import csr_offsets, csr_rows
from sae.kernels.topk_decode import scatter_acc

__all__ = ["DenseEncode", "SparseEncode", "select_batch_topk"]


def select_batch_topk(acts: torch.Tensor, n_select: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, indices, offsets) of the n_select largest entries of the (B, M) matrix, in row-major order."""
    n_rows, n_cols = acts.shape
    values, flat = acts.view(-1).topk(n_select, sorted=False)
    flat, perm = flat.sort()
    rows = flat // n_cols
    return values[perm], flat - rows * n_cols, csr_offsets(rows, n_rows)


class SparseEncode(torch.autograd.Function):
    """(x, W_enc, b_enc, b_dec, k, batch, backend) -> (values, indices, offsets), CSR (see sae.acts).

    batch=False: per token, the k largest pre-activations, then ReLU (values may be 0).
    batch=True: ReLU, then the k * B largest activations of the whole batch (BatchTopK).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, b_dec: torch.Tensor,
                k: int, batch: bool, backend: ModuleType) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_in = x - b_dec
        with torch.autocast(x.device.type, enabled=False):  # the kernels compute in the parameters' dtype
            pre = torch.addmm(bias, x_in, weight.t())
        if batch:
            values, indices, offsets = select_batch_topk(pre.relu_(), k * pre.shape[0])
        else:
            values, indices = pre.topk(k, dim=1, sorted=False)
            values, indices = values.relu_().view(-1), indices.view(-1)
            offsets = torch.arange(0, indices.numel() + 1, k, device=x.device)
        del pre
        ctx.save_for_backward(x_in, weight, values, indices, offsets)
        ctx.backend = backend
        ctx.mark_non_differentiable(indices, offsets)
        return values, indices, offsets

    @staticmethod
    def backward(ctx: Any, grad_values: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        x_in, weight, values, indices, offsets = ctx.saved_tensors
        backend = ctx.backend
        need_x, need_weight, need_bias, need_b_dec = ctx.needs_input_grad[:4]
        n_latents = weight.shape[0]
        grad_pre = torch.where(values > 0, grad_values, 0.0)  # ReLU after the selection
        grad_bias = torch.zeros(n_latents, dtype=torch.float32, device=weight.device).index_add_(
            0, indices, grad_pre.float()).to(weight.dtype)
        grad_weight = grad_x = None
        if need_weight:
            rows = csr_rows(offsets, indices.numel())
            grad_weight = scatter_acc(backend, grad_pre, indices, rows, x_in, n_latents)
        if need_x:
            grad_x = backend.gather_acc(grad_pre, indices, offsets, weight)
        grad_b_dec = -(grad_bias @ weight) if need_b_dec else None
        return grad_x, grad_weight, grad_bias if need_bias else None, grad_b_dec, None, None, None


class DenseEncode(torch.autograd.Function):
    """(x, W_enc, b_enc, b_dec, threshold or None, bandwidth, backend) -> (acts, l0 or None).

    threshold None: ReLU. Otherwise JumpReLU (threshold >= 0), and l0 is the float32 count of
    active latents per token, differentiable with respect to the threshold through the STE.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, b_dec: torch.Tensor,
                threshold: torch.Tensor | None, bandwidth: float, backend: ModuleType
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x_in = x - b_dec
        with torch.autocast(x.device.type, enabled=False):  # the kernels compute in the parameters' dtype
            acts, window, l0 = backend.linear_act(x_in, weight, bias, threshold, bandwidth)
        ctx.save_for_backward(x_in, weight, acts, window, threshold)
        ctx.bandwidth = bandwidth
        ctx.backend = backend
        return acts, l0

    @staticmethod
    def backward(ctx: Any, grad_acts: torch.Tensor | None, grad_l0: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, ...]:
        x_in, weight, acts, window, threshold = ctx.saved_tensors
        need_x, need_weight, need_bias, need_b_dec, need_threshold = ctx.needs_input_grad[:5]
        if grad_acts is None:  # only the L0 term reached us
            grad_acts = torch.zeros_like(acts)
        grad_pre, grad_bias, grad_threshold = ctx.backend.act_backward(
            grad_acts, acts, window, grad_l0, threshold, ctx.bandwidth)
        grad_weight = grad_pre.t() @ x_in if need_weight else None
        grad_x = grad_pre @ weight if need_x else None
        grad_b_dec = -(grad_bias @ weight) if need_b_dec else None
        return (grad_x, grad_weight, grad_bias if need_bias else None, grad_b_dec,
                grad_threshold if need_threshold else None, None, None)
