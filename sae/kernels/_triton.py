"""The Triton backend: four kernels (`*_k`), each behind a launcher with the eager backend's signature.

- `gather_acc_k`: out[b] = sum over row b's entries n of values[n] * weight[indices[n]] (the TopK
  decode, and transposed, the per-latent gradient aggregation);
- `gather_dot_k`: out[n] = <grad[rows[n]], weight[indices[n]]> (the gradient of the active values);
- `bias_act_k`: bias + ReLU or JumpReLU (threshold, L0 count, STE window) in one pass over z;
- `act_backward_k`: the gradient of bias_act, with per-block column sums for the bias and
  threshold gradients (summed by the launcher: deterministic, no atomics on those).

Every kernel accumulates in float32 and stores in the output's dtype. The launchers run compiled
kernels on CUDA tensors. With TRITON_INTERPRET=1 in the environment before Python starts (Triton
reads it when it defines its own `tl.*` helpers, at import), `triton.jit` yields interpreted kernels
that run on CPU tensors: that is how the tests exercise this file without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "act_backward", "gather_acc", "gather_dot", "linear_act"]

INTERPRETED = bool(triton.knobs.runtime.interpret)
"""Whether the kernels were defined for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""

_BLOCK_B = 32
_BLOCK_M = 128


def _block_d(d: int) -> int:
    return min(triton.next_power_of_2(d), 256)


@triton.jit
def gather_acc_k(values, indices, offsets, weight, out, d, stride_w, stride_out, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = cols < d
    start = tl.load(offsets + row)
    end = tl.load(offsets + row + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n in range(start, end):
        m = tl.load(indices + n)
        v = tl.load(values + n).to(tl.float32)
        acc += v * tl.load(weight + m * stride_w + cols, mask=in_d, other=0.0).to(tl.float32)
    tl.store(out + row * stride_out + cols, acc.to(out.dtype.element_ty), mask=in_d)


def gather_acc(values: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
               weight: torch.Tensor) -> torch.Tensor:
    """(B, d): row b = sum of values[n] * weight[indices[n]] over n in offsets[b]:offsets[b + 1]."""
    weight = weight.contiguous()
    n_rows, d = offsets.numel() - 1, weight.shape[1]
    out = weight.new_empty(n_rows, d)
    if n_rows and d:
        block = _block_d(d)
        gather_acc_k[(n_rows, triton.cdiv(d, block))](values.contiguous(), indices.contiguous(), offsets.contiguous(),
                                                      weight, out, d, weight.stride(0), out.stride(0), BLOCK_D=block)
    return out


@triton.jit
def gather_dot_k(grad, weight, indices, rows, out, d, stride_g, stride_w, BLOCK_D: tl.constexpr):
    n = tl.program_id(0)
    m = tl.load(indices + n)
    r = tl.load(rows + n)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        in_d = cols < d
        g = tl.load(grad + r * stride_g + cols, mask=in_d, other=0.0).to(tl.float32)
        acc += g * tl.load(weight + m * stride_w + cols, mask=in_d, other=0.0).to(tl.float32)
    tl.store(out + n, tl.sum(acc, axis=0).to(out.dtype.element_ty))


def gather_dot(grad: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
               rows: torch.Tensor) -> torch.Tensor:
    """(N,): entry n = <grad[rows[n]], weight[indices[n]]>."""
    del offsets  # the eager twin needs them; one program per entry does not
    grad, weight = grad.contiguous(), weight.contiguous()
    n_entries, d = indices.numel(), weight.shape[1]
    out = weight.new_empty(n_entries)
    if n_entries:
        gather_dot_k[(n_entries,)](grad, weight, indices.contiguous(), rows.contiguous(), out, d,
                                   grad.stride(0), weight.stride(0), BLOCK_D=_block_d(d))
    return out


@triton.jit
def bias_act_k(z, bias, threshold, window, l0, n_rows, n_cols, half_bandwidth,
               JUMP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    ptrs = rows[:, None] * n_cols + cols[None, :]  # int64: B x M may pass 2**31
    b = tl.load(bias + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    pre = tl.load(z + ptrs, mask=inside, other=0.0).to(tl.float32) + b[None, :]
    pre = pre.to(z.dtype.element_ty).to(tl.float32)  # the pre-activation as stored, as in the eager twin
    if JUMP:
        t = tl.load(threshold + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        above = (pre > t[None, :]) & inside
        act = tl.where(above, pre, 0.0)
        near = (tl.abs(pre - t[None, :]) < half_bandwidth) & inside
        tl.store(window + ptrs, near.to(tl.int8), mask=inside)
        tl.atomic_add(l0 + rows, tl.sum(above.to(tl.float32), axis=1), mask=rows < n_rows)
    else:
        act = tl.maximum(pre, 0.0)
    tl.store(z + ptrs, act.to(z.dtype.element_ty), mask=inside)


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, threshold: torch.Tensor | None,
               bandwidth: float) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """act(x @ weight.T + bias): the GEMM in torch (cuBLAS), then bias + activation in one kernel pass."""
    z = x @ weight.t()
    n_rows, n_cols = z.shape
    jump = threshold is not None
    window = torch.empty(z.shape, dtype=torch.int8, device=z.device) if jump else None
    l0 = torch.zeros(n_rows, dtype=torch.float32, device=z.device) if jump else None
    grid = (triton.cdiv(n_rows, _BLOCK_B), triton.cdiv(n_cols, _BLOCK_M))
    if n_rows and n_cols:
        bias_act_k[grid](z, bias.contiguous(), threshold.contiguous() if jump else bias, window if jump else z,
                         l0 if jump else z, n_rows, n_cols, 0.5 * bandwidth,
                         JUMP=jump, BLOCK_B=_BLOCK_B, BLOCK_M=_BLOCK_M)
    return z, window, l0


@triton.jit
def act_backward_k(grad, act, window, grad_l0, threshold, grad_z, part_b, part_t, n_rows, n_cols, inv_bandwidth,
                   JUMP: tl.constexpr, HAS_L0: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_b = tl.program_id(0)
    rows = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_cols = cols < n_cols
    inside = (rows[:, None] < n_rows) & in_cols[None, :]
    ptrs = rows[:, None] * n_cols + cols[None, :]
    g = tl.load(grad + ptrs, mask=inside, other=0.0).to(tl.float32)
    a = tl.load(act + ptrs, mask=inside, other=0.0).to(tl.float32)
    gz = tl.where(a > 0.0, g, 0.0)
    tl.store(grad_z + ptrs, gz.to(grad_z.dtype.element_ty), mask=inside)
    tl.store(part_b + pid_b * n_cols + cols, tl.sum(gz, axis=0), mask=in_cols)
    if JUMP:
        near = tl.load(window + ptrs, mask=inside, other=0).to(tl.float32)
        t = tl.load(threshold + cols, mask=in_cols, other=0.0).to(tl.float32)
        # d act / d t = -(t / bandwidth) * window (and d L0 / d t = -(1 / bandwidth) * window)
        gt = -(t * inv_bandwidth) * tl.sum(near * g, axis=0)
        if HAS_L0:
            gl = tl.load(grad_l0 + rows, mask=rows < n_rows, other=0.0).to(tl.float32)
            gt -= inv_bandwidth * tl.sum(near * gl[:, None], axis=0)
        tl.store(part_t + pid_b * n_cols + cols, gt, mask=in_cols)


def act_backward(grad: torch.Tensor, act: torch.Tensor, window: torch.Tensor | None, grad_l0: torch.Tensor | None,
                 threshold: torch.Tensor | None, bandwidth: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of linear_act's activation with respect to z, the bias and the threshold (STE)."""
    grad = grad.contiguous()
    n_rows, n_cols = act.shape
    n_blocks = triton.cdiv(n_rows, _BLOCK_B)
    jump = threshold is not None
    has_l0 = jump and grad_l0 is not None
    grad_z = torch.empty_like(act)
    part_b = torch.zeros(n_blocks, n_cols, dtype=torch.float32, device=act.device)
    part_t = torch.zeros(n_blocks, n_cols, dtype=torch.float32, device=act.device) if jump else part_b
    if n_rows and n_cols:
        act_backward_k[(n_blocks, triton.cdiv(n_cols, _BLOCK_M))](
            grad, act, window if jump else act, grad_l0.contiguous() if has_l0 else act,
            threshold.contiguous() if jump else act, grad_z, part_b, part_t, n_rows, n_cols, 1.0 / bandwidth,
            JUMP=jump, HAS_L0=has_l0, BLOCK_B=_BLOCK_B, BLOCK_M=_BLOCK_M)
    grad_t = part_t.sum(0).to(threshold.dtype) if jump else None
    return grad_z, part_b.sum(0).to(act.dtype), grad_t
