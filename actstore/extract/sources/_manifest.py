"""The manifest: which images a job reads, in which order, with which labels."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from actstore.errors import ConfigError

__all__ = ["LabelColumn", "Manifest"]


@dataclass(frozen=True)
class LabelColumn:
    """A label per image beyond the main one (an iNat taxonomy level): codes into names, held compactly."""

    codes: np.ndarray
    """int32 per image, an index into names; -1: no label."""
    names: list[str]
    """The distinct values, sorted."""

    def values(self, start: int, stop: int) -> list[str]:
        """The labels of images [start, stop) as text, "" for none."""
        return ["" if c < 0 else self.names[c] for c in self.codes[start:stop].tolist()]


@dataclass(frozen=True, eq=False)
class Manifest:
    """The ordered images of a dataset; image i is uris[i]. Compare manifests by fingerprint."""

    uris: list[str]
    """Image references (actstore.extract.sources.ImageRef): absolute local paths or full URLs of files, or of a
    parquet row or tar member inside one."""
    labels: np.ndarray
    """int32 label per image (read-only); -1 where the source gives none."""
    class_names: list[str]
    """Name of each label value (labels index into it); empty when labels are bare integers or absent."""
    source: str
    """The folder, list file, glob or shard pattern the manifest was built from, as given."""
    label_columns: Mapping[str, LabelColumn] = field(default_factory=dict)
    """More labels per image by name (iNat2021: kingdom ... species); they become columns of the images table."""
    fingerprint: str = field(init=False)
    """sha256 of uris, labels, class names and label columns: equal fingerprints mean the same images in the same
    order. The source string is left out (uris are absolute already) and so are file contents (stat-ing a
    million objects costs minutes on S3)."""

    def __post_init__(self) -> None:
        labels = np.array(self.labels, dtype=np.int32)  # a copy, made read-only: the fingerprint covers it
        labels.flags.writeable = False
        if labels.shape != (len(self.uris),):
            raise ConfigError(f"manifest: {len(self.uris)} uris but labels of shape {labels.shape}")
        h = hashlib.sha256()
        h.update("\0".join(self.uris).encode())
        h.update(b"\1" + labels.astype("<i4").tobytes())
        h.update(b"\1" + "\0".join(self.class_names).encode())
        for name, column in self.label_columns.items():  # none: the same fingerprint as before they existed
            if column.codes.shape != (len(self.uris),):
                raise ConfigError(f"manifest: label column {name!r} has {len(column.codes)} rows, not {len(self)}")
            h.update(b"\2" + name.encode() + b"\1" + np.asarray(column.codes, "<i4").tobytes())
            h.update(b"\1" + "\0".join(column.names).encode())
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "label_columns", dict(self.label_columns))
        object.__setattr__(self, "fingerprint", h.hexdigest())

    def __len__(self) -> int:
        return len(self.uris)
