"""SAE kernels: TopK decode as a gather, the encoder backward at the active latents only, bias +
activation fused. Two backends with the same four functions (gather_acc, gather_dot, linear_act,
act_backward): Triton (`_triton`, the GPU: each `*_k` kernel behind its launcher) and eager
PyTorch (`_eager`, the CPU, and the twin the Triton kernels are tested against). The autograd
Functions are written once over a backend: `topk_decode.SparseDecode`, `encoder.SparseEncode`
(topk, batchtopk) and `encoder.DenseEncode` (relu, jumprelu).

`backend_for` is the one place that picks: Triton for CUDA tensors when Triton imports, and for
CPU tensors when Triton runs its interpreter (TRITON_INTERPRET=1 set before Python starts);
eager otherwise, and always when SAE_EAGER=1 (read at each call, so it can be flipped at run time).
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from sae.acts import SparseActs
from sae.kernels import _eager
from sae.kernels.encoder import DenseEncode, SparseEncode
from sae.kernels.topk_decode import SparseDecode

__all__ = ["backend_for", "dense_encode", "eager_backend", "sparse_decode", "sparse_encode", "triton_backend"]

EAGER_ENV = "SAE_EAGER"


def eager_backend() -> ModuleType:
    return _eager


@functools.cache
def triton_backend() -> ModuleType | None:
    """The Triton backend, or None where Triton does not import (CPU-only torch wheels)."""
    try:
        from sae.kernels import _triton
    except ImportError:
        return None
    return _triton


def backend_for(tensor: torch.Tensor) -> ModuleType:
    """The backend that runs on `tensor`'s device (see the module docstring)."""
    if os.environ.get(EAGER_ENV) == "1":
        return _eager
    if tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        triton = triton_backend()
        if triton is not None and (tensor.is_cuda or triton.INTERPRETED):
            return triton
    return _eager


def sparse_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int,
                  batch: bool = False, backend: ModuleType | None = None) -> SparseActs:
    """TopK (or with batch=True, BatchTopK) latents of x, W_enc of shape (d_sae, d_in); see encoder.SparseEncode."""
    values, indices, offsets = SparseEncode.apply(x, W_enc, b_enc, b_dec, k, batch, backend or backend_for(W_enc))
    return SparseActs(values, indices, offsets, W_enc.shape[0])


def dense_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                 threshold: torch.Tensor | None = None, bandwidth: float = 1.0, backend: ModuleType | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ReLU (threshold None) or JumpReLU latents of x and, for JumpReLU, the per-token L0; see encoder.DenseEncode."""
    return DenseEncode.apply(x, W_enc, b_enc, b_dec, threshold, bandwidth, backend or backend_for(W_enc))


def sparse_decode(acts: SparseActs, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None,
                  backend: ModuleType | None = None) -> torch.Tensor:
    """b_dec + the gather-accumulate of the active rows of W_dec (d_sae, d_in); see topk_decode."""
    return SparseDecode.apply(acts.values, acts.indices, acts.offsets, W_dec, b_dec, backend or backend_for(W_dec))
