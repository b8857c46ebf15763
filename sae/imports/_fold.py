"""What readers share: a decoder bias that the peer does not subtract before its encoder, folded into b_enc."""

from __future__ import annotations

import torch

_ROWS = 8192
"""Encoder rows widened to float64 at once: a 65K x 768 encoder is not copied whole."""


def fold_b_dec(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """float64 b_enc + W_enc @ b_dec (W_enc (d_sae, d_in)): the peer's x @ W_enc.T + b_enc written as ours,
    (x - b_dec) @ W_enc.T + that."""
    b = b_dec.double()
    return b_enc.double() + torch.cat([W_enc[i:i + _ROWS].double() @ b for i in range(0, W_enc.shape[0], _ROWS)])
