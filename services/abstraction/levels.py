"""How abstract a feature is: where its top images' labels meet in a label hierarchy.

A hierarchy is a tree of named nodes (each with one parent, roots have none); the images' labels are its leaves (or
any of its nodes). A feature's level is the deepest node under which at least `min_share` of its top images' labels
fall (their lowest common ancestor when min_share is 1), with that share: a feature that fires on one species sits
at the species, one that fires on a whole family at the family, one that fires on anything at the root.

    Hierarchy.from_parents({"cat": "felid", "lion": "felid", "felid": "mammal", "mammal": None})
    Hierarchy.from_table("wordnet.csv")            # label,parent rows (ImageNet's WordNet tree, any other)
    Hierarchy.from_columns(rows, ("family", "genus", "species"))   # iNat's taxonomy columns, coarse to fine
    feature_levels(top_labels, hierarchy, min_share=0.5)           # (d_sae, k) label ids -> node, depth, share

Memory is the (features x k) top labels and a (labels x depth) ancestor table, never images x features.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from actstore.errors import ConfigError

__all__ = ["Hierarchy", "Levels", "feature_levels"]


@dataclass(frozen=True)
class Hierarchy:
    """A label tree: node names, each node's parent index (-1 for a root) and depth (roots: 0)."""

    names: tuple[str, ...]
    parents: np.ndarray = field(repr=False)
    depths: np.ndarray = field(repr=False)

    @classmethod
    def from_parents(cls, parents: Mapping[str, str | None]) -> Hierarchy:
        """From {node: parent or None}; parents named only as parents become roots. A cycle is refused."""
        names = list(dict.fromkeys([*parents, *(p for p in parents.values() if p)]))
        index = {n: i for i, n in enumerate(names)}
        up = np.array([index[parents[n]] if parents.get(n) else -1 for n in names], np.int64)
        depths = np.full(len(names), -1, np.int64)
        for i in range(len(names)):
            chain, j = [], i
            while j >= 0 and depths[j] < 0:
                if j in chain:
                    raise ConfigError(f"label hierarchy: {names[j]!r} is its own ancestor")
                chain.append(j)
                j = int(up[j])
            base = -1 if j < 0 else int(depths[j])
            for k, node in enumerate(reversed(chain)):
                depths[node] = base + 1 + k
        return cls(tuple(names), up, depths)

    @classmethod
    def from_table(cls, path: str) -> Hierarchy:
        """From a CSV file of `label,parent` rows (a header row naming them is skipped; an empty parent: a root)."""
        try:
            with open(path, newline="") as f:
                rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
        except OSError as e:
            raise ConfigError(f"label hierarchy {path}: {e.strerror or e}") from None
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["label", "parent"]:
            rows = rows[1:]
        bad = [i + 1 for i, r in enumerate(rows) if len(r) != 2 or not r[0].strip()]
        if bad or not rows:
            raise ConfigError(f"label hierarchy {path}: expected label,parent rows (row {bad[0] if bad else 1})")
        parents: dict[str, str | None] = {}
        for label, parent in ((r[0].strip(), r[1].strip() or None) for r in rows):
            if parents.get(label, parent) != parent:
                raise ConfigError(f"label hierarchy {path}: {label!r} has two parents")
            parents[label] = parent
        return cls.from_parents(parents)

    @classmethod
    def from_columns(cls, rows: Iterable[Sequence[str]], columns: Sequence[str]) -> Hierarchy:
        """From per-image label columns, coarse to fine (iNat: kingdom ... species): each value is the node
        "column:value" under the row's value of the column before."""
        parents: dict[str, str | None] = {}
        for row in rows:
            parent = None
            for column, value in zip(columns, row):
                node = f"{column}:{value}"
                if parents.setdefault(node, parent) != parent:
                    raise ConfigError(f"label columns: {node} sits under both {parents[node]} and {parent}")
                parent = node
        return cls.from_parents(parents)

    def index(self, names: Iterable[str]) -> np.ndarray:
        """The node index of each name; a name not in the hierarchy is refused."""
        lookup = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in lookup]
        if missing:
            raise ConfigError(f"label hierarchy: no node {missing[0]!r} ({len(missing)} labels missing)")
        return np.array([lookup[n] for n in names], np.int64)

    def ancestors(self) -> np.ndarray:
        """(nodes, max depth + 1) int64: row i holds node i's ancestor at each depth (itself at its own), -1 past it."""
        out = np.full((len(self.names), int(self.depths.max(initial=0)) + 1), -1, np.int64)
        for i in range(len(self.names)):
            j = i
            while j >= 0:
                out[i, self.depths[j]] = j
                j = int(self.parents[j])
        return out


@dataclass(frozen=True)
class Levels:
    """Per feature: the deepest node holding at least min_share of its top images' labels (-1: none, no labels)."""

    node: np.ndarray
    depth: np.ndarray
    share: np.ndarray
    """The share of the feature's labelled top images under that node."""
    n: np.ndarray
    """The feature's labelled top images."""


def feature_levels(top_labels: np.ndarray, hierarchy: Hierarchy, min_share: float = 0.5) -> Levels:
    """`top_labels` (features, k): node indices of each feature's top images' labels, -1 where there is no image
    or no label. At each depth, the most common ancestor's count; the deepest depth where it reaches min_share of the
    feature's labelled images is its level."""
    if not 0 < min_share <= 1:
        raise ConfigError(f"min_share must be in (0, 1], got {min_share}")
    top = np.asarray(top_labels, np.int64)
    table = hierarchy.ancestors()
    n = (top >= 0).sum(1)
    node, depth, share = np.full(len(top), -1), np.full(len(top), -1), np.zeros(len(top))
    for d in range(table.shape[1]):
        at = np.where(top >= 0, table[np.maximum(top, 0), d], -1)  # each image's ancestor at depth d (-1: shallower)
        ranked = np.sort(at, 1)
        same = np.concatenate([np.zeros((len(top), 1), bool), ranked[:, 1:] == ranked[:, :-1]], 1)
        run = np.zeros(ranked.shape, np.int64)  # run[i, j]: length of the run of equal values ending at j
        for j in range(ranked.shape[1]):
            run[:, j] = np.where(same[:, j], run[:, j - 1] + 1, 1) if j else 1
        run[ranked < 0] = 0
        best = run.argmax(1)
        count = run[np.arange(len(top)), best]
        ok = (n > 0) & (count >= np.ceil(min_share * n - 1e-9))
        node = np.where(ok, ranked[np.arange(len(top)), best], node)
        depth = np.where(ok, d, depth)
        share = np.where(ok, count / np.maximum(n, 1), share)
    return Levels(node, depth, share, n)
