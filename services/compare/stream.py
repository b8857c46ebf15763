"""The comparison's streaming accumulators: rows (images, or patches) arrive in blocks, in order.

`PairStats` keeps, for two sets of features A (F_a columns) and B (F_b columns) seen on the same rows,
everything the comparison needs and nothing that grows with the number of rows:

    per feature     rows it fires on, sum and sum of squares (shifted, float64), its top-k rows
    across          the (F_a, F_b) cross-product matrix of the shifted values (float32), only when
                    Pearson correlations are asked for

Memory: 4 * tile * F_b bytes for the cross products of a tile of A's features (all of them: 1 GiB at
16,384 x 16,384; more tiles, more passes), plus one staging buffer of `rows_per_update` rows per side and
the top-k tables, whatever the number of rows. Staging makes every update one large GEMM whatever the
caller's block size (a block may be a single image).

Numerics: values are shifted by the first update's column means before they are summed and multiplied,
so that the cross products of frequently firing features do not cancel catastrophically in float32;
`pearson()` turns the matrix into correlations in place (no second matrix).

`MaxDiff` is the second pass: for given pairs (a, b) the largest |z_a - z_b| over rows, z the standardized
activations (the means and standard deviations of the first pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MaxDiff", "PairStats", "TopRows"]


class TopRows:
    """Per feature, the k rows with the largest positive values seen so far (ties: the earlier row first).

    Each entry is one int64 key, the value's float32 bits (monotonic for values >= 0) above the complement
    of its row id, so that one `topk` orders by value, then by row, exactly. A block's candidates are its
    own top-k by value (one topk over the block, no sort).
    """

    SLICE = 1024
    """Tied features keyed exactly at once (bounds the temporary keys)."""
    _LOW = 0xFFFFFFFF

    def __init__(self, n_features: int, k: int, device: torch.device) -> None:
        self.k = k
        self.keys = torch.zeros((n_features, 0), dtype=torch.int64, device=device)

    def update(self, x: torch.Tensor, ids: torch.Tensor) -> None:
        """x (n, F) float32 of rows `ids` (each < 2^32, ascending)."""
        if x.shape[0] > self.k:
            # the block's own top-k by value; where the k-th value is positive and tied with rows left out,
            # topk's pick among them is arbitrary, so those (rare) features are keyed exactly
            vals, pos = x.topk(self.k, dim=0, sorted=False)
            kth = vals.min(dim=0).values
            tied = ((kth > 0) & ((x >= kth).sum(0) > self.k)).nonzero().squeeze(1)
            cand = self._keys(vals.t(), ids[pos.t()])
            for f in range(0, tied.numel(), self.SLICE):
                cols = tied[f:f + self.SLICE]
                exact = self._keys(x[:, cols].t(), ids.expand(cols.numel(), -1))
                cand[cols] = exact.topk(self.k, dim=1).values
        else:
            cand = self._keys(x.t(), ids.expand(x.shape[1], -1))
        keys = torch.cat([self.keys, cand], dim=1)
        self.keys = keys.topk(min(self.k, keys.shape[1]), dim=1).values

    def _keys(self, values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(F, m) order keys of values (F, m) at rows ids (F, m)."""
        bits = values.clamp_min(0).contiguous().view(torch.int32).to(torch.int64)
        return bits.bitwise_left_shift_(32).bitwise_or_(self._LOW - ids)

    def values(self) -> torch.Tensor:
        """(F, <=k) the kept values, strongest first."""
        return self.keys.bitwise_right_shift(32).to(torch.int32).view(torch.float32)

    def sets(self) -> torch.Tensor:
        """(F, k) row ids of each feature's top rows, -1 where it fired on fewer (positive values only)."""
        ids = torch.full((self.keys.shape[0], self.k), -1, dtype=torch.int64, device=self.keys.device)
        rows = self._LOW - self.keys.bitwise_and(self._LOW)
        ids[:, :rows.shape[1]] = torch.where(self.values() > 0, rows, -1)
        return ids


@dataclass
class Side:
    """One side's per-feature sums (over shifted values) and top rows."""

    shift: torch.Tensor
    total: torch.Tensor
    total_sq: torch.Tensor
    fired: torch.Tensor
    top: TopRows

    @classmethod
    def empty(cls, n_features: int, k: int, device: torch.device) -> Side:
        zeros = torch.zeros(n_features, dtype=torch.float64, device=device)
        return cls(zeros.float(), zeros, zeros.clone(), zeros.long(), TopRows(n_features, k, device))

    def add(self, x: torch.Tensor, ids: torch.Tensor) -> None:
        """Fold rows x (n, F) in; x is shifted in place (for the cross products)."""
        self.fired += (x > 0).sum(0)
        self.top.update(x, ids)
        y = x.sub_(self.shift)
        self.total += y.sum(0, dtype=torch.float64)
        self.total_sq += torch.linalg.vector_norm(y, dim=0).double().square_()  # no (n, F) temporary

    def moments(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, std, mean of the shifted values), float64; std 0 for a feature that never varies."""
        shifted_mean = self.total / max(n, 1)
        var = (self.total_sq / max(n, 1) - shifted_mean.square()).clamp_min_(0)
        return self.shift.double() + shifted_mean, var.sqrt(), shifted_mean


class PairStats:
    """The streaming pass over rows of two feature sets (see the module docstring).

    The cross products cover A's features `tile` (all of them by default); `next_tile` starts the next tile,
    whose cross products another pass over the same rows accumulates (the per-feature sums, top rows and
    shifts of the first pass are kept), so that the (F_a, F_b) matrix need never be whole."""

    def __init__(self, n_a: int, n_b: int, k: int, *, cross: bool = True, rows_per_update: int = 4096,
                 device: torch.device | str = "cpu", tile: slice | None = None) -> None:
        self.device = torch.device(device)
        self.rows_per_update = max(1, rows_per_update)
        self.n = 0
        self.a, self.b = Side.empty(n_a, k, self.device), Side.empty(n_b, k, self.device)
        self.tile = range(n_a)[tile or slice(None)]
        self.cross = torch.zeros((len(self.tile), n_b), device=self.device) if cross else None
        # rows are staged in place: one (rows_per_update, F) buffer per side, shifted in place when full
        self._xa = torch.empty((self.rows_per_update, n_a), device=self.device)
        self._xb = torch.empty((self.rows_per_update, n_b), device=self.device)
        self._ids = torch.empty(self.rows_per_update, dtype=torch.int64, device=self.device)
        self._n_staged = 0
        self._shifted = False
        self._first_pass = True

    def update(self, xa: torch.Tensor, xb: torch.Tensor, ids: torch.Tensor) -> None:
        """Rows `ids` (ascending) of both sides: xa (n, F_a), xb (n, F_b), float32."""
        if xa.shape[0] != xb.shape[0] or xa.shape[0] != ids.shape[0]:
            raise ValueError(f"row counts differ: {xa.shape[0]}, {xb.shape[0]}, {ids.shape[0]} ids")
        done = 0
        while done < xa.shape[0]:
            n = min(xa.shape[0] - done, self.rows_per_update - self._n_staged)
            dst = slice(self._n_staged, self._n_staged + n)
            self._xa[dst], self._xb[dst], self._ids[dst] = xa[done:done + n], xb[done:done + n], ids[done:done + n]
            self._n_staged += n
            done += n
            if self._n_staged == self.rows_per_update:
                self._flush()

    def _flush(self) -> None:
        if not self._n_staged:
            return
        n, self._n_staged = self._n_staged, 0
        xa, xb, ids = self._xa[:n], self._xb[:n], self._ids[:n]
        if not self._shifted:
            self.a.shift, self.b.shift = xa.mean(0), xb.mean(0)
            self._shifted = True
        if self._first_pass:  # shifts the rows in place
            self.a.add(xa, ids)
            self.b.add(xb, ids)
            self.n += n
        else:
            xa.sub_(self.a.shift)
            xb.sub_(self.b.shift)
        if self.cross is not None:
            self.cross.addmm_(xa[:, self.tile.start:self.tile.stop].t(), xb)

    def finish(self) -> PairStats:
        """Fold the rows still staged; call once after each pass's last update."""
        self._flush()
        return self

    def next_tile(self, tile: slice) -> None:
        """Accumulate the cross products of A's features `tile` over another pass of the same rows, in the same
        order (the matrix of the previous tile must have been taken by `pearson`)."""
        self.tile = range(self.a.shift.numel())[tile]
        self.cross = torch.zeros((len(self.tile), self.b.shift.numel()), device=self.device)
        self._first_pass = False

    def pearson(self) -> torch.Tensor:
        """The (tile, F_b) correlations of the tile's features of A with every feature of B, computed in place of
        the cross products (which it replaces).

        A feature with no variance over the rows (never fired, or constant) correlates 0 with everything."""
        if self.cross is None:
            raise ValueError("pearson() needs cross=True")
        n, tile = max(self.n, 1), slice(self.tile.start, self.tile.stop)
        _, std_a, shifted_a = self.a.moments(n)
        _, std_b, shifted_b = self.b.moments(n)
        c = self.cross.div_(n)
        c.addr_(shifted_a[tile].float(), shifted_b.float(), alpha=-1)  # covariance; rank-1 update, no temporary
        c.mul_(_inverse(std_a[tile]).unsqueeze(1)).mul_(_inverse(std_b).unsqueeze(0))
        self.cross = None
        return c.clamp_(-1, 1)


def _inverse(std: torch.Tensor) -> torch.Tensor:
    """1/std as float32, 0 where std is 0 (or lost to rounding against the values' scale)."""
    ok = std > 1e-12
    return torch.where(ok, 1 / std.clamp_min(1e-12), torch.zeros_like(std)).float()


class MaxDiff:
    """Second pass: for pairs (pa[i], pb[i]), the largest |z_a - z_b| over the rows, z = (x - mean) / std."""

    def __init__(self, pa: torch.Tensor, pb: torch.Tensor, mean_a: torch.Tensor, std_a: torch.Tensor,
                 mean_b: torch.Tensor, std_b: torch.Tensor) -> None:
        self.pa, self.pb = pa, pb
        self.mean_a, self.inv_a = mean_a[pa].float(), _inverse(std_a[pa])
        self.mean_b, self.inv_b = mean_b[pb].float(), _inverse(std_b[pb])
        self.value = torch.zeros(pa.numel(), device=pa.device)

    def update(self, xa: torch.Tensor, xb: torch.Tensor) -> None:
        if not xa.shape[0] or not self.pa.numel():
            return
        za = (xa[:, self.pa].float() - self.mean_a).mul_(self.inv_a)
        zb = (xb[:, self.pb].float() - self.mean_b).mul_(self.inv_b)
        torch.maximum(self.value, za.sub_(zb).abs_().amax(0), out=self.value)
