"""Splicing: an SAE inside a backbone's forward pass, at the layer and tokens it was trained on.

    with splice(backbone, sae, norm, layer="10", mode="error", edit=edit_fn(edits, layout)):
        embedding, logits = backbone.outputs(images)

The tokens go through the same hook point extraction reads (`Backbone.intervene`), as a batch (no Python per
token), behind the checkpoint's input normalization:

    x_n   = (x - mean) * scale                  the loader's transform, recorded with the SAE
    a     = encode(x_n); a' = edit(a, token)    an edit between encode and decode (None: a' = a)
    delta = sum_f (a'_f - a_f) W_dec[f] / scale over the edited features f only, in the SAE's dtype
    replace: x <- undo(decode(a)) + delta       the model sees the reconstruction (plus the edit)
    error:   x <- x + delta                     = undo(decode(a')) + (x - undo(decode(a))): the reconstruction
                                                plus the error term, computed as the left-hand side

So in error mode with no edit the hook hands the tokens back untouched and the forward is bitwise the clean one
(whatever the SAE's dtype), tokens no edit reaches keep their bits, and an edit costs (edited tokens x edited
features x d) whatever the SAE's width: the latents are never densified for it.

Token kinds are the loader's: "patches" (the default the trainer uses), "cls" or "all"; the others pass as
they were. The same hook runs an ablation (`ablate`): the layer's chosen tokens set to zero or a mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from actstore.errors import ConfigError
from actstore.extract.hooked import Backbone
from actstore.loader import Normalization
from actstore.store import TokenLayout
from sae.acts import SparseActs
from sae.model import SparseAutoencoder
from sae.tokens import TOKENS, Latents, TokenEncoder, token_positions

__all__ = ["MODES", "TOKENS", "Edit", "SpliceStats", "ablate", "edit_delta", "latent_values", "splice",
           "token_positions"]

MODES = ("replace", "error")


class Edit(Protocol):
    """What an edit does between encode and decode (sae.edits.FeatureEdits builds one from feature edits)."""

    @property
    def features(self) -> Sequence[int]:
        """The latents it may change; the others are neither read nor touched."""

    def __call__(self, values: Tensor, positions: Tensor) -> Tensor:
        """(rows, len(features)) those latents on the spliced tokens, rows ordered (image, token); (rows,) each
        row's token index in the layer's layout (0 is CLS where the layout has one, patches follow row-major) ->
        their edited values."""


@dataclass
class SpliceStats:
    """Reconstruction of the spliced tokens, summed over every forward pass (normalized space, float64): FVU
    over all of them (not a mean of batch FVUs) and L0."""

    rows: int = 0
    sse: float = 0.0
    active: int = 0
    sum_x: Tensor | None = field(default=None, repr=False)
    sum_sq: float = 0.0

    def add(self, x: Tensor, x_hat: Tensor, acts: Latents) -> None:
        x64 = x.double()
        self.rows += x.shape[0]
        self.sse += float((x64 - x_hat.double()).square().sum())
        self.sum_sq += float(x64.square().sum())
        total = x64.sum(0)
        self.sum_x = total if self.sum_x is None else self.sum_x + total
        values = acts.values if isinstance(acts, SparseActs) else acts
        self.active += int((values != 0).sum())

    @property
    def fvu(self) -> float:
        """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over every spliced token."""
        if not self.rows:
            return float("nan")
        centered = self.sum_sq - float(self.sum_x.square().sum()) / self.rows
        return self.sse / max(centered, 1e-300)

    @property
    def l0(self) -> float:
        return self.active / self.rows if self.rows else float("nan")


def _on_tokens(layout: TokenLayout, tokens: str, fn: Callable[[Tensor, Tensor], Tensor]
               ) -> Callable[[Tensor], Tensor]:
    """A (B, T, d) -> (B, T, d) map that sends the chosen tokens, as (B * n, d) rows with their layout index,
    through fn and keeps the others."""
    positions = token_positions(layout, tokens)

    def apply(x: Tensor) -> Tensor:
        b, n = x.shape[0], positions.numel()
        pos = positions.to(x.device)
        chosen = x[:, pos].reshape(b * n, x.shape[2])
        new = fn(chosen, pos.repeat(b))
        if new is chosen:  # unchanged: hand the layer's own tensor back (Backbone.intervene then keeps its output)
            return x
        new = new.reshape(b, n, x.shape[2]).to(x.dtype)
        if n == x.shape[1]:
            return new
        out = x.clone()
        out[:, pos] = new
        return out

    return apply


def latent_values(acts: Latents, features: Tensor) -> Tensor:
    """(rows, len(features)) the latents `features` (distinct) of every row, zeros where inactive, in the
    latents' dtype: a gather from dense latents, a match over the active entries of sparse ones (no dense row)."""
    if not isinstance(acts, SparseActs):
        return acts[:, features]
    entry, column = (acts.indices.unsqueeze(1) == features).nonzero(as_tuple=True)
    out = acts.values.new_zeros(acts.n_tokens, features.numel())
    out[acts.rows()[entry], column] = acts.values[entry]
    return out


def edit_delta(sae: SparseAutoencoder, acts: Latents, edit: Edit, positions: Tensor, scale: float
               ) -> tuple[Tensor, Tensor]:
    """(rows the edit changes, their change (n, d) in the SAE's dtype): sum over the edited features of
    (a'_f - a_f) W_dec[f] / scale, from those features' latents alone."""
    features = torch.as_tensor(list(edit.features), dtype=torch.long, device=sae.W_dec.device)
    before = latent_values(acts, features)
    change = edit(before, positions) - before
    rows = change.ne(0).any(1).nonzero().squeeze(1)
    return rows, (change[rows] @ sae.W_dec[features]) / scale


@contextmanager
def splice(backbone: Backbone, sae: SparseAutoencoder, normalization: Normalization | None, *, layer: int | str,
           tokens: str = "patches", mode: str = "error", edit: Edit | None = None,
           stats: SpliceStats | None = None) -> Iterator[None]:
    """While open, `backbone`'s forward passes run with `sae` spliced in at `layer` (see the module docstring);
    `stats` collects the SAE's reconstruction of the unedited latents."""
    if mode not in MODES:
        raise ConfigError(f"splice mode must be one of {', '.join(MODES)}, got {mode!r}")
    spec = backbone.spec(layer)
    if spec.d != sae.cfg.d_in:
        raise ConfigError(f"the SAE reads {sae.cfg.d_in}-wide activations; layer {spec.name} of "
                          f"{backbone.cfg.model} is {spec.d} wide")
    if edit is not None and not edit.features:
        edit = None
    encoder = TokenEncoder(sae, normalization, spec, tokens)
    undo = normalization.undo if normalization is not None else (lambda t: t)
    scale = normalization.scale if normalization is not None else 1.0

    def run(x: Tensor, pos: Tensor) -> Tensor:
        if mode == "error" and edit is None and stats is None:
            return x  # nothing to compute: the clean tokens, bit for bit
        x_n = encoder.prepare(x)
        acts = sae.encode(x_n)
        out = x
        if stats is not None or mode == "replace":
            x_hat_n = sae.decode(acts)
            if stats is not None:
                stats.add(x_n, x_hat_n, acts)
            if mode == "replace":
                out = undo(x_hat_n.float()).to(x.dtype)
        if edit is None:
            return out
        rows, delta = edit_delta(sae, acts, edit, pos, scale)
        if not rows.numel():
            return out
        out = out.clone()
        out[rows] += delta.to(out.dtype)
        return out

    sae.eval()
    with torch.no_grad(), backbone.intervene(spec.name, _on_tokens(spec.tokens, tokens, run)):
        yield


@contextmanager
def ablate(backbone: Backbone, *, layer: int | str, tokens: str = "patches", value: Tensor | None = None
           ) -> Iterator[None]:
    """While open, `layer`'s chosen tokens are replaced by `value` (d,) (e.g. the store's mean), or zeros."""
    spec = backbone.spec(layer)
    if value is not None and value.shape != (spec.d,):
        raise ConfigError(f"ablate: value must have shape ({spec.d},), got {tuple(value.shape)}")

    def run(x: Tensor, pos: Tensor) -> Tensor:
        return torch.zeros_like(x) if value is None else value.to(x.device, x.dtype).expand_as(x)

    with torch.no_grad(), backbone.intervene(spec.name, _on_tokens(spec.tokens, tokens, run)):
        yield
