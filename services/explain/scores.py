"""How well an explanation predicts where its feature fires, on held-out images only.

Detection (as delphi and SAEBench score language-model features): a judge sees one image at a time with the
explanation and says whether the feature fires on it; the score is the balanced accuracy over as many activating as
non-activating images (the mean of the two recalls, so a judge that always says yes scores 0.5), and the AUROC of its
P(yes) where the backend gives probabilities. Embedding (as vision-interp scores image features with CLIP): the AUROC
of the cosine between the explanation's text embedding and each held-out image's embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

__all__ = ["auroc", "balanced_accuracy"]


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """The probability that an activating image scores above a non-activating one (ties count half: the
    Mann-Whitney U over the sizes); None without both kinds."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def balanced_accuracy(said_yes: Sequence[bool], labels: Sequence[bool]) -> float | None:
    """The mean of the recall on activating and on non-activating images; None without both kinds."""
    p, y = np.asarray(said_yes, bool), np.asarray(labels, bool)
    if y.all() or not y.any():
        return None
    return float((p[y].mean() + (~p[~y]).mean()) / 2)
