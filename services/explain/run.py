"""`actstore explain`: words for an index's features, scored on held-out images, written beside the index.

For each chosen feature (services.explain.examples), a batch at a time:

    vocabulary   CLIP/SigLIP stores: the words of a vocabulary closest to its top images (services.explain.vocab)
    vlm          --explainer: a VLM's phrase for its highlighted top images and weaker examples (prompts, backends)
    detection    --judge (default: the explainer): each explanation judged on held-out activating and silent images
    embedding    CLIP/SigLIP stores: each explanation's text embedding against the held-out images' embeddings

The SAE, its store and (for embeddings) its backbone are the ones the index names, checked to belong together before
anything is computed. Rows go to explanations.parquet (services.explain.layout) every `flush_seconds` and when the run
ends or fails, so an interrupted run loses at most that much: run again and it resumes with the features not yet
explained; --overwrite starts over (it replaces only a table of ours).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from actstore.config import check_at_least
from actstore.errors import ConfigError
from actstore.extract.zeroshot import DEFAULT_TEMPLATE
from services.explain.examples import Examples, choose_features, examples
from services.explain.layout import EXPLANATIONS, SCHEMA, is_explanations, read_explanations, write_explanations
from services.explain.models import Models, open_models
from services.explain.pool import images_per_block, silent_pool
from services.explain.prompts import explain_prompt, highlighted, judge_prompt, phrase
from services.explain.scores import auroc, balanced_accuracy
from services.explain.vocab import best_words

__all__ = ["ExplainConfig", "run_explain"]


@dataclass(frozen=True)
class ExplainConfig:
    """What `actstore explain` explains, with what, and how it scores."""

    index: str
    """Feature index folder (from `actstore index`): explanations.parquet is written into it."""
    explainer: str | None = None
    """VLM that explains: hf:MODEL (local transformers, a hub id or folder) or openai:MODEL (an OpenAI-compatible
    endpoint, --endpoint); none: vocabulary names only."""
    judge: str | None = None
    """VLM that scores detection (same forms); default the explainer; none: no detection scores."""
    endpoint: str | None = None
    """Base URL of the OpenAI-compatible endpoint (vLLM, SGLang, a hosted API; default OpenAI's)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable that holds the endpoint's key (read from there only, never written anywhere)."""
    vocabulary: str | None = None
    """File of words for vocabulary names, one per line (default: the store's class names and built-in concepts)."""
    vocabulary_names: bool = True
    """Name features from the vocabulary where the store's model has a text tower (CLIP, SigLIP)."""
    features: str = "live"
    """Which features: live, densest:N, a list 3,17,42, or sample:N (seeded)."""
    seed: int = 0
    """Seeds the feature sample, the pool of silent images and the held-out choice."""
    n_top: int = 6
    """Top images the explainer sees, highlighted (the vocabulary's images too)."""
    n_weaker: int = 2
    """Weaker examples (lowest value bands) the explainer sees."""
    n_held_out: int = 10
    """Held-out activating images judged per explanation (and as many silent ones)."""
    n_pool: int = 512
    """Store images encoded to find each feature's silent images."""
    n_words: int = 5
    """Vocabulary words kept per feature."""
    image_size: int = 224
    """Side of the images sent to the VLM, pixels."""
    template: str = DEFAULT_TEMPLATE
    """Prompt template of text embeddings (vocabulary words and explanations)."""
    concurrency: int = 8
    """Requests in flight at once to an endpoint."""
    batch: int = 32
    """Features explained and judged together (their requests share the concurrency)."""
    flush_seconds: float = 30.0
    """Rows are written to explanations.parquet at least this often."""
    device: str = "cpu"
    """Where the SAE, the backbone and a local VLM run."""
    memory_gb: float | None = None
    """Working memory of the pool's pass (its bitmap, a chunk, the SAE's latents of a block), in GB (default: half of
    this machine's memory)."""
    fidelity_check: bool = True
    """Check that the rebuilt backbone makes the store's activations before embedding with it."""
    overwrite: bool = False
    """Start over, replacing the index's explanations.parquet (only one of ours)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for the store, the SAE and the images."""

    def __post_init__(self) -> None:
        check_at_least(self, "explain", {"n_top": 1, "n_weaker": 0, "n_held_out": 1, "n_pool": 1, "n_words": 1,
                                         "image_size": 32, "concurrency": 1, "batch": 1})
        if "{}" not in self.template:
            raise ConfigError(f"--template must contain {{}} for the words, got {self.template!r}")


@dataclass
class _Run:
    """The open run: the index, the models and the rows so far."""

    cfg: ExplainConfig
    models: Models
    rows: list[dict[str, Any]]
    written: float = field(default_factory=time.monotonic)

    def flush(self) -> None:
        write_explanations(self.cfg.index, pa.Table.from_pylist(self.rows, schema=SCHEMA))
        self.written = time.monotonic()


def _previous(cfg: ExplainConfig) -> list[dict[str, Any]]:
    """The rows a run resumes from: the index's table unless --overwrite; a file there that is not ours is refused
    whatever the flags."""
    path = Path(cfg.index) / EXPLANATIONS
    if not path.exists():
        return []
    if not is_explanations(path):
        raise ConfigError(f"{path} is not an explanations table written by actstore explain; move it away first")
    if cfg.overwrite:
        return []
    table = read_explanations(cfg.index)
    return [] if table is None else table.to_pylist()


def run_explain(cfg: ExplainConfig, progress: bool = True, say: Any = print) -> Path:
    """Explain and score the chosen features, writing explanations.parquet into the index; returns its path."""
    rows = _previous(cfg)
    models = open_models(cfg)  # the SAE, store and backbone checked together; the backends opened
    try:
        fired = models.reader.features["n_images_fired"]
        features = choose_features(cfg.features, fired, cfg.seed)
        if (fired[features] == 0).any():
            say(f"left out {int((fired[features] == 0).sum())} features that never fired: nothing to explain")
            features = features[fired[features] > 0]
        done = {(r["feature"], r["explainer"]) for r in rows}
        todo = np.array([f for f in features if any((int(f), e) not in done for e in models.explainers)], np.int64)
        say(_cost_line(cfg, models, len(features), todo.size))
        if todo.size == 0:
            return Path(cfg.index) / EXPLANATIONS
        step = images_per_block(models.store, models.encoder, cfg.n_pool, todo.size, cfg.memory_gb)
        pool = silent_pool(models.store, models.encoder, todo, cfg.n_pool, cfg.seed, step)
        models.set_reference(pool.images)
        run = _Run(cfg, models, rows)
        bar = tqdm(total=todo.size, desc="explain", unit="feature", disable=not progress)
        try:
            arrays = models.arrays
            for s in range(0, todo.size, cfg.batch):
                chosen = [examples(arrays, int(f), pool.silent(int(f)), cfg.n_top, cfg.n_weaker,
                                   cfg.n_held_out, cfg.seed) for f in todo[s:s + cfg.batch]]
                run.rows.extend(_batch(run, chosen, done))
                bar.update(len(chosen))
                if time.monotonic() - run.written >= cfg.flush_seconds:
                    run.flush()
        finally:
            bar.close()
            run.flush()
    finally:
        models.close()
    return Path(cfg.index) / EXPLANATIONS


def _cost_line(cfg: ExplainConfig, models: Models, n_chosen: int, n_todo: int) -> str:
    """What the run will ask for, before it starts: features, calls and images per backend."""
    parts = [f"explain: {n_todo} of {n_chosen} chosen features to do ({', '.join(models.explainers)})"]
    if models.explainer is not None:
        per = cfg.n_top + cfg.n_weaker
        parts.append(f"{models.explainer.model}: {n_todo} calls x {per} images = {n_todo * per} images")
    if models.judge is not None:
        calls = n_todo * len(models.explainers) * 2 * cfg.n_held_out
        parts.append(f"judge {models.judge.model}: up to {n_todo} features x {len(models.explainers)} explanations x "
                     f"{2 * cfg.n_held_out} images = {calls} calls of 1 image")
    if models.tower is not None:
        parts.append(f"embeddings: up to {n_todo * (cfg.n_top + 2 * cfg.n_held_out)} images through "
                     f"{models.backbone_name}")
    return "; ".join(parts)


def _batch(run: _Run, chosen: list[Examples], done: set[tuple[int, str]]) -> list[dict[str, Any]]:
    """The rows of one batch of features: explanations, then every judgement of the batch at once."""
    cfg, models = run.cfg, run.models
    rows: list[dict[str, Any]] = []
    if "vocabulary" in models.explainers:
        rows += [_vocabulary_row(models, ex, cfg.n_words) for ex in chosen if (ex.feature, "vocabulary") not in done]
    if models.explainer is not None:
        wanted = [ex for ex in chosen if (ex.feature, "vlm") not in done]
        grid = models.grid
        prompts = [explain_prompt([highlighted(models.thumbnail(i), h, grid) for i, h in zip(ex.top, ex.heatmaps)],
                                  [models.thumbnail(i) for i in ex.weaker]) for ex in wanted]
        answers = dict(models.explainer.ask(prompts))
        rows += [_row(ex, "vlm", phrase(answers[j]), models.explainer.model) for j, ex in enumerate(wanted)]
    by_feature = {ex.feature: ex for ex in chosen}
    if models.judge is not None:
        _judge(models, rows, by_feature)
    if models.tower is not None:
        for r in rows:
            ex = by_feature[r["feature"]]
            r["embedding_auroc"] = models.embedding_auroc(r["explanation"], ex.activating, ex.silent)
    return rows


def _row(ex: Examples, explainer: str, explanation: str, model: str, words: list[str] | None = None,
         scores: list[float] | None = None) -> dict[str, Any]:
    return {"feature": ex.feature, "explainer": explainer, "explanation": explanation, "model": model, "judge": None,
            "words": words or [], "word_scores": scores or [], "shown": ex.shown, "detection_accuracy": None,
            "detection_auroc": None, "detection_n": 0, "embedding_auroc": None}


def _vocabulary_row(models: Models, ex: Examples, n_words: int) -> dict[str, Any]:
    order, scores = best_words(models.embed(ex.top), models.reference, models.word_vectors, n_words)
    words = [models.words[i] for i in order]
    return _row(ex, "vocabulary", words[0], models.backbone_name, words, scores)


def _judge(models: Models, rows: list[dict[str, Any]], by_feature: dict[int, Examples]) -> None:
    """Detection scores of every row: one judge call per held-out image and explanation, all of the batch at once."""
    owners: list[int] = []  # the row of each prompt
    labels: list[list[bool]] = [[] for _ in rows]
    prompts = []
    for r, row in enumerate(rows):
        ex = by_feature[row["feature"]]
        for images, label in ((ex.activating, True), (ex.silent, False)):
            for i in images:
                owners.append(r)
                labels[r].append(label)
                prompts.append(judge_prompt(models.thumbnail(i), row["explanation"]))
    verdicts: list[list[Any]] = [[] for _ in rows]
    for j, verdict in sorted(models.judge.judge(prompts), key=lambda item: item[0]):
        verdicts[owners[j]].append(verdict)
    for row, said, truth in zip(rows, verdicts, labels):
        p_yes = [v.p_yes for v in said]
        row.update(judge=models.judge.model, detection_n=len(said),
                   detection_accuracy=balanced_accuracy([v.yes for v in said], truth),
                   detection_auroc=auroc(p_yes, truth) if said and None not in p_yes else None)
