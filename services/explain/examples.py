"""Which features are explained, and which images each explainer sees and each score is computed on.

Everything comes from the index's arrays (top images with heatmaps, value-band samples), except the images a feature
does not fire on: those are a seeded pool of the store's ok images whose every patch was encoded through the SAE
(services.explain.pool). An explainer sees the feature's strongest images (highlighted) and a few weaker ones from
its lowest value bands; the held-out activating images are drawn round-robin across the value bands, strongest band
first, then from the rest of the top images: never one the explainer saw. Non-activating images are as many, drawn
from the pool's images on which the feature is zero everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from actstore.errors import ConfigError

__all__ = ["Examples", "FEATURES_HELP", "choose_features", "examples"]

FEATURES_HELP = ("live (every feature that fired), densest:N (the N that fire on most images), a list 3,17,42, "
                 "or sample:N (N live features at random, --seed)")


def choose_features(spec: str, n_images_fired: np.ndarray, seed: int = 0) -> np.ndarray:
    """The feature ids `spec` names (FEATURES_HELP), sorted; a one-line ConfigError for any other spec or for ids
    outside the SAE."""
    live = np.flatnonzero(n_images_fired > 0)
    d_sae = n_images_fired.size
    if spec == "live":
        return live
    if m := re.fullmatch(r"densest:(\d+)", spec):
        order = np.argsort(-n_images_fired[live], kind="stable")
        return np.sort(live[order[:int(m[1])]])
    if m := re.fullmatch(r"sample:(\d+)", spec):
        n = min(int(m[1]), live.size)
        return np.sort(np.random.default_rng(seed).choice(live, n, replace=False))
    if re.fullmatch(r"\d+(,\d+)*", spec):
        ids = np.unique(np.array([int(v) for v in spec.split(",")]))
        if ids[-1] >= d_sae:
            raise ConfigError(f"--features: no feature {ids[-1]} (the SAE has {d_sae})")
        return ids
    raise ConfigError(f"--features {spec!r}: expected {FEATURES_HELP}")


@dataclass(frozen=True)
class Examples:
    """One feature's images: shown to the explainer (top ones with their heatmaps, weaker ones plain) and held out
    for scoring (activating, non-activating)."""

    feature: int
    top: list[int]
    """Strongest images, highlighted for the explainer (and the vocabulary's images)."""
    heatmaps: np.ndarray
    """(len(top), n_patches) float32: the feature's value at each patch of each top image."""
    weaker: list[int]
    """Examples from the lowest value bands, shown plain."""
    activating: list[int]
    """Held out: images the feature fires on."""
    silent: list[int]
    """Held out: images the feature is zero on everywhere."""

    @property
    def shown(self) -> list[int]:
        return self.top + self.weaker


def examples(arrays: dict[str, np.ndarray], fid: int, silent_pool: np.ndarray, n_top: int, n_weaker: int,
             n_held_out: int, seed: int) -> Examples:
    """Feature `fid`'s Examples from the index's arrays (services.index.layout) and the pool images on which it is
    silent (`silent_pool`, image ids)."""
    held = arrays["top_images"][fid]
    top_all = [int(i) for i in held[held >= 0]]
    top = top_all[:n_top]
    bands = _bands(arrays["band_images"][fid])  # strongest band first
    weaker = _round_robin(bands[::-1], set(top), n_weaker)  # the weakest bands first, one image from each in turn
    activating = _round_robin([*bands, top_all[n_top:]], {*top, *weaker}, n_held_out)
    rng = np.random.default_rng([seed, fid])
    silent = [int(i) for i in rng.permutation(silent_pool)[:len(activating)]]
    heat = arrays["heatmaps"][fid, :len(top)].astype(np.float32)
    return Examples(fid, top, heat, weaker, activating, silent)


def _bands(band_images: np.ndarray) -> list[list[int]]:
    """The feature's value bands' sampled images (highest band first), empty bands left out."""
    return [[int(i) for i in row[row >= 0]] for row in band_images[::-1] if (row >= 0).any()]


def _round_robin(groups: list[list[int]], taken: set[int], n: int) -> list[int]:
    """Up to n images not in `taken`, one from each group in turn (a group's images in order)."""
    out: list[int] = []
    queues = [[i for i in g if i not in taken] for g in groups]
    seen = set(taken)
    while len(out) < n and any(queues):
        for q in queues:
            while q and q[0] in seen:
                q.pop(0)
            if q and len(out) < n:
                i = q.pop(0)
                out.append(i)
                seen.add(i)
    return out
