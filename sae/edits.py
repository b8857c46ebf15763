"""Feature edits: what steering does to an SAE's latents between encode and decode (sae.splice's `edit`).

    FeatureEdit(12, "set", 0.0)                  feature 12 off on every token the SAE was trained on
    parse_edit("40:add:2.5@3,4")                 feature 40 raised by 2.5 on patches 3 and 4 (row-major in the grid)

Ops, on the feature's activation a of each chosen token:

    scale   a * value        set     value
    add     a + value        clamp   min(a, value): a ceiling (clamp 0 turns a feature off where it fires)

Where: "all" (default: every token of the kind the SAE was trained on, i.e. all patches for a patch SAE), "cls",
"patches", or patch indices (0 is the top-left patch, row-major, whatever precedes the patches in the layout).
Spliced (sae.splice), an edit moves a token by exactly the sum over the edited features of (a'_f - a_f) W_dec[f],
de-normalized and computed from those features alone: what is not edited stays as it was, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from actstore.errors import ConfigError
from actstore.store import TokenLayout

__all__ = ["MAX_VALUE", "OPS", "WHERE", "FeatureEdit", "FeatureEdits", "apply_edits", "check_edits", "edit_fn",
           "edited_tokens", "parse_edit"]

OPS = ("scale", "add", "set", "clamp")
WHERE = ("all", "cls", "patches")
MAX_VALUE = 1e6
"""|value| above this is refused: no SAE activation is near it, and it would only overflow half-precision models."""


@dataclass(frozen=True)
class FeatureEdit:
    """One edit of one feature: `op` with `value` on the tokens `where` names (a WHERE word or patch indices)."""

    feature: int
    op: str
    value: float
    where: str | tuple[int, ...] = "all"

    def __post_init__(self) -> None:
        if isinstance(self.feature, bool) or not isinstance(self.feature, int) or self.feature < 0:
            raise ConfigError(f"edit: feature must be an integer >= 0, got {self.feature!r}")
        if self.op not in OPS:
            raise ConfigError(f"edit: op must be one of {', '.join(OPS)}, got {self.op!r}")
        if not isinstance(self.value, (int, float)) or not math.isfinite(self.value) or abs(self.value) > MAX_VALUE:
            raise ConfigError(f"edit: value must be a finite number with |value| <= {MAX_VALUE:g}, got {self.value!r}")
        if isinstance(self.where, str):
            if self.where not in WHERE:
                raise ConfigError(f"edit: where must be one of {', '.join(WHERE)} or patch indices, got {self.where!r}")
        else:
            where = tuple(self.where)
            if not where or any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in where):
                raise ConfigError(f"edit: patch indices must be integers >= 0, got {list(where)}")
            object.__setattr__(self, "where", where)
        object.__setattr__(self, "value", float(self.value))

    def __str__(self) -> str:
        where = self.where if isinstance(self.where, str) else ",".join(map(str, self.where))
        return f"{self.feature}:{self.op}:{self.value:g}@{where}"


def parse_edit(spec: str) -> FeatureEdit:
    """`FEATURE:OP:VALUE[@WHERE]`, WHERE one of all (default), cls, patches or comma-separated patch indices."""
    body, _, where = spec.strip().partition("@")
    parts = body.split(":")
    if len(parts) != 3:
        raise ConfigError(f"edit {spec!r}: expected FEATURE:OP:VALUE[@WHERE], e.g. 12:set:0@all or 40:add:2.5@3,4")
    feature, op, value = parts
    try:
        f, v = int(feature), float(value)
    except ValueError:
        raise ConfigError(f"edit {spec!r}: FEATURE must be an integer and VALUE a number") from None
    where = where.strip() or "all"
    if where not in WHERE:
        try:
            where = tuple(int(p) for p in where.split(","))
        except ValueError:
            raise ConfigError(f"edit {spec!r}: WHERE must be all, cls, patches or comma-separated patch "
                              "indices") from None
    return FeatureEdit(f, op.strip(), v, where)


def check_edits(edits: Sequence[FeatureEdit], d_sae: int, layout: TokenLayout) -> None:
    """Every feature inside the SAE, every patch inside the grid, CLS only where the layout has one."""
    for e in edits:
        if e.feature >= d_sae:
            raise ConfigError(f"edit {e}: the SAE has {d_sae} features (0..{d_sae - 1})")
        if e.where == "cls" and not layout.cls:
            raise ConfigError(f"edit {e}: this layer has no CLS token")
        if isinstance(e.where, tuple) and max(e.where) >= layout.n_patches:
            raise ConfigError(f"edit {e}: patch indices must be < {layout.n_patches} "
                              f"(a {layout.grid[0]} x {layout.grid[1]} grid, row-major)")


def _rows(where: str | tuple[int, ...], positions: Tensor, layout: TokenLayout, trained: str) -> Tensor:
    """(rows,) bool: which spliced tokens (by layout index) an edit applies to."""
    cls = int(layout.cls)
    if where == "all":
        where = trained
    if where == "all":
        return torch.ones_like(positions, dtype=torch.bool)
    if where == "cls":
        return positions < cls
    if where == "patches":
        return positions >= cls
    chosen = torch.tensor(where, device=positions.device) + cls
    return torch.isin(positions, chosen)


def edited_tokens(edit: FeatureEdit, layout: TokenLayout, trained: str = "patches") -> Tensor:
    """The layout indices of the tokens `edit` applies to, ascending (what a head checks it can see)."""
    return _rows(edit.where, torch.arange(layout.n_tokens), layout, trained).nonzero().flatten()


def apply_edits(latents: Tensor, positions: Tensor, edits: Sequence[FeatureEdit], layout: TokenLayout,
                trained: str = "patches", features: Sequence[int] | None = None) -> Tensor:
    """The edited copy of latents (rows, n), rows at layout indices `positions`; edits apply in order. Column j holds
    feature `features[j]` (default: feature j, all of an SAE's latents). `trained`: the token kind the SAE was
    trained on, which "all" means."""
    column = {f: j for j, f in enumerate(features)} if features is not None else None
    out = latents.clone()
    for e in edits:
        rows = _rows(e.where, positions, layout, trained)
        j = e.feature if column is None else column[e.feature]
        a = out[rows, j]
        out[rows, j] = {"scale": lambda: a * e.value, "add": lambda: a + e.value,
                        "set": lambda: torch.full_like(a, e.value), "clamp": lambda: a.clamp(max=e.value)}[e.op]()
    return out


@dataclass(frozen=True)
class FeatureEdits:
    """sae.splice's `edit` for a list of feature edits: it sees and returns only the edited features' latents."""

    edits: tuple[FeatureEdit, ...]
    layout: TokenLayout
    trained: str = "patches"

    @property
    def features(self) -> tuple[int, ...]:
        return tuple(sorted({e.feature for e in self.edits}))

    def __call__(self, values: Tensor, positions: Tensor) -> Tensor:
        return apply_edits(values, positions, self.edits, self.layout, self.trained, self.features)


def edit_fn(edits: Sequence[FeatureEdit], layout: TokenLayout, trained: str = "patches") -> FeatureEdits | None:
    """sae.splice's `edit` for these edits (None for no edit: the clean model)."""
    return FeatureEdits(tuple(edits), layout, trained) if edits else None
