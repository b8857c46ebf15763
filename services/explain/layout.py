"""explanations.parquet: the words `actstore explain` wrote for an index's features, beside the index's own files.

Light on purpose (pyarrow and the standard library): the service and the report read it without torch.

One row per feature and explainer: `vocabulary` (a CLIP or SigLIP text tower's best words for the feature's top
images, no VLM) and `vlm` (a vision-language model's short explanation of its highlighted top images). Both are
scored the same way, so the report can set the VLM against the vocabulary baseline:

    feature              int32    the SAE feature
    explainer            string   "vocabulary" or "vlm"
    explanation          string   the words (vocabulary: its best word; vlm: the VLM's phrase)
    model                string   what wrote it: the text tower's backbone, or the VLM ("openai:MODEL@HOST",
                                  "hf:MODEL")
    judge                string   the detection judge's model id; null when detection was not scored
    words                list<string>   vocabulary: the top words, best first; vlm: empty
    word_scores          list<float32>  their scores (cosine with the top images' mean embedding, less the
                                        cosine with a reference set's: services.explain.vocab)
    shown                list<int32>    the images the explainer saw (never among the scored ones)
    detection_accuracy   float32  balanced accuracy of the judge on held-out images; null when not scored
    detection_auroc      float32  the same judgements' AUROC from the judge's P(yes); null without probabilities
    detection_n          int32    held-out images judged (activating + non-activating); 0 when not scored
    embedding_auroc      float32  the explanation's text embedding against held-out activating and non-activating
                                  images' embeddings (CLIP/SigLIP stores); null elsewhere

The file's schema metadata holds `format` (FORMAT) and `format_version`: a file without them is not ours, and
`actstore explain --overwrite` refuses to replace it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from actstore.errors import CorruptDataError, StoreFormatError
from actstore.store import normalize_url

__all__ = ["EXPLAINERS", "EXPLANATIONS", "FORMAT", "FORMAT_VERSION", "SCHEMA", "is_explanations",
           "read_explanations", "write_explanations"]

EXPLANATIONS = "explanations.parquet"
FORMAT, FORMAT_VERSION = "actstore-explanations", 1
EXPLAINERS = ("vocabulary", "vlm")
SCHEMA = pa.schema([
    ("feature", pa.int32()), ("explainer", pa.string()), ("explanation", pa.string()), ("model", pa.string()),
    ("judge", pa.string()), ("words", pa.list_(pa.string())), ("word_scores", pa.list_(pa.float32())),
    ("shown", pa.list_(pa.int32())), ("detection_accuracy", pa.float32()), ("detection_auroc", pa.float32()),
    ("detection_n", pa.int32()), ("embedding_auroc", pa.float32()),
], metadata={b"format": FORMAT.encode(), b"format_version": str(FORMAT_VERSION).encode()})


def is_explanations(path: str | Path) -> bool:
    """Whether the file at `path` is an explanations table of ours (its schema metadata says so)."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return False
    return meta.get(b"format") == FORMAT.encode()


def read_explanations(index: str | Path) -> pa.Table | None:
    """The index's explanations table (SCHEMA's columns), or None when `actstore explain` has not written one; a
    CorruptDataError when the file cannot be read, a StoreFormatError when it is not ours or of another version."""
    path = Path(normalize_url(str(index))) / EXPLANATIONS
    if not path.exists():
        return None
    try:
        table = pq.ParquetFile(path).read()  # not read_table: it imports pandas
    except (OSError, pa.ArrowException) as e:
        raise CorruptDataError(f"{path}: unreadable ({' '.join(str(e).split())})", key=EXPLANATIONS) from None
    meta = table.schema.metadata or {}
    if meta.get(b"format") != FORMAT.encode() or meta.get(b"format_version") != str(FORMAT_VERSION).encode():
        raise StoreFormatError(f"{path}: not an {FORMAT} v{FORMAT_VERSION} table")
    missing = [name for name in SCHEMA.names if name not in table.column_names]
    if missing:
        raise CorruptDataError(f"{path}: no column {missing[0]}", key=EXPLANATIONS)
    return table.select(SCHEMA.names)


def write_explanations(index: str | Path, table: pa.Table) -> Path:
    """Write `table` (SCHEMA's columns, rows sorted by feature then explainer) as the index's explanations table,
    under a temporary name renamed into place: a reader never sees half a file."""
    path = Path(normalize_url(str(index))) / EXPLANATIONS
    table = table.select(SCHEMA.names).cast(SCHEMA)
    table = table.sort_by([("feature", "ascending"), ("explainer", "ascending")])
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        pq.write_table(table, part)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return path
