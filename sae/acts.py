"""SparseActs: the latents of the topk kinds as a compressed sparse row (CSR) batch.

Row b (token b) holds entries offsets[b]:offsets[b + 1] of `values` (the activations) and
`indices` (their latents). TopK rows all hold k entries; BatchTopK rows hold a variable number,
which is why the format is CSR rather than a (B, k) pair. Entries may carry the value 0 (a
selected latent whose pre-activation was <= 0): they reconstruct nothing and count as inactive
in the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SparseActs", "csr_offsets", "csr_rows", "positive_entries"]


@dataclass(frozen=True)
class SparseActs:
    values: torch.Tensor
    """(N,) activations, row-major (token by token); differentiable."""
    indices: torch.Tensor
    """(N,) int64 latent of each value."""
    offsets: torch.Tensor
    """(B + 1,) int64 start of each token's entries; offsets[-1] == N."""
    d_sae: int

    @classmethod
    def from_topk(cls, values: torch.Tensor, indices: torch.Tensor, d_sae: int) -> SparseActs:
        """From (B, k) values and indices, e.g. torch.topk's."""
        n_rows, k = values.shape
        offsets = torch.arange(0, (n_rows + 1) * k, k, device=values.device)
        return cls(values.reshape(-1), indices.reshape(-1).long(), offsets, d_sae)

    @property
    def n_tokens(self) -> int:
        return self.offsets.numel() - 1

    def counts(self) -> torch.Tensor:
        """(B,) number of entries per token (zero-valued entries included)."""
        return self.offsets.diff()

    def rows(self) -> torch.Tensor:
        """(N,) token of each entry."""
        return csr_rows(self.offsets, self.values.numel())

    def to_dense(self) -> torch.Tensor:
        """(B, d_sae) activations, zeros elsewhere; differentiable with respect to `values`."""
        dense = self.values.new_zeros(self.n_tokens, self.d_sae)
        return dense.index_put((self.rows(), self.indices), self.values, accumulate=True)

    def detach(self) -> SparseActs:
        return SparseActs(self.values.detach(), self.indices, self.offsets, self.d_sae)


def csr_rows(offsets: torch.Tensor, n_entries: int) -> torch.Tensor:
    """(n_entries,) the row of each entry of a CSR layout with these (B + 1,) offsets."""
    rows = torch.arange(offsets.numel() - 1, device=offsets.device)
    return rows.repeat_interleave(offsets.diff(), output_size=n_entries)


def csr_offsets(keys: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(n_rows + 1,) where each row's entries start, for entries sorted by their row `keys` in [0, n_rows)."""
    offsets = keys.new_zeros(n_rows + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(keys, minlength=n_rows), 0, out=offsets[1:])
    return offsets


def positive_entries(acts: torch.Tensor | SparseActs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, latent, value) of every positive latent of a batch's activations (dense or sparse), rows
    ascending, values float32: what the passes over a store (the index, the comparison) fold."""
    if isinstance(acts, SparseActs):
        rows, feats, vals = acts.rows(), acts.indices, acts.values
    else:
        rows, feats = (acts > 0).nonzero(as_tuple=True)
        vals = acts[rows, feats]
    keep = vals > 0
    return rows[keep], feats[keep], vals[keep].float()
