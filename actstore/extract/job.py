"""The extraction job: images -> backbone activations -> a complete store, with Ray Data.

One row of the pipeline is one work unit (= one shard's image range), so
Ray's retries, reordering and batching never split or mix units:

    units to do -> decode   (CPU tasks: fetch bytes, decode, model's PIL transform -> uint8;
                             with --masks, the masks' per-patch labels)
                -> forward  (actor pool, GPUs when present: normalize, hooked forward,
                             convert to the store's dtype, overflow checked; labels passed through)
                -> write    (CPU tasks: StoreWriter.write_unit, record last)

A unit written twice gives the same bytes, so retries are harmless, and a
rerun of the same command skips units that already have their record.

Ray records the operators' arguments (Ray Data's dataset metadata: the dashboard, export events under the
session's logs), walking dicts and showing other objects by str(): the images' storage options (credentials)
go to the decode tasks as an object-store reference (ray.put), read back with ray.get, never as a dict.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from actstore.extract.backbones import BackboneConfig, load_backbone
from actstore.extract.preprocess import Preprocessor
from actstore.cluster import init_ray, refuse_local_paths_on_a_cluster
from actstore.config import config_json
from actstore.extract.decode import DEFAULT_MAX_PIXELS, decode_image
from actstore.extract.masks import MaskLabeler, mask_classes, mask_uris, parse_mask_suffix
from actstore.errors import ConfigError, user_error
from actstore.extract.sources import ImageRef, build_manifest, read_bytes
from actstore.store import (CODECS, DEFAULT_CODEC, DEFAULT_DTYPE, DTYPES, STATUS_OK, STATUS_REJECTED, StoreSpec,
                            StoreWriter, filesystem, put_bytes, to_storage)

log = logging.getLogger(__name__)

CONFIG_KEY = "extract_config.json"


@dataclass(frozen=True)
class ExtractConfig:
    """One extraction run; written to <store>/extract_config.json."""

    images: str
    """The dataset, local, s3:// or hf://: an image folder (class subfolders give labels; iNat2021's JSON beside
    it gives its taxonomy), a .txt/.csv/.parquet list of URIs, parquet files with the images inside (a file, a
    folder or a glob), or WebDataset tar shards (a file, a folder, a glob or train-{0000..0099}.tar)."""
    model: str
    """Backbone, "open_clip:<arch>", "timm:<arch>" or "hf:<hub id, folder or built-in name>"."""
    out: str
    """Store URL (a path, file://..., s3://...)."""
    layers: tuple[int | str, ...] = (-2,)
    """Block indices (negative from the end) or layer names; all come from one forward pass."""
    batch_size: int = 64
    """Images per forward pass."""
    images_per_shard: int = 256
    """Images per work unit (= shard)."""
    dtype: str = field(default=DEFAULT_DTYPE, metadata={"choices": DTYPES})
    """Stored dtype: bfloat16, float16 or float32."""
    codec: str = field(default=DEFAULT_CODEC, metadata={"choices": CODECS})
    """Chunk codec: blosc-lz4, zstd or none."""
    pretrained: str | None = None
    """Hub tag or local checkpoint path; None for random weights."""
    init_seed: int = 0
    """Seed of random weights (recorded in the store)."""
    trust_remote_code: bool = False
    """Run the modeling code an hf: model ships (auto_map in its config.json: actstore.extract.remote_vlm); not
    recorded in the store, so each later command that loads the model needs it again."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels are rejected as decompression bombs."""
    num_actors: int | None = None
    """Forward actors at least (the pool's minimum); default 1."""
    max_actors: int | None = None
    """Forward actors at most: with GPUs the pool grows toward it while units wait; default one per GPU
    of the cluster (at least num_actors). A CPU-only cluster runs num_actors."""
    address: str | None = None
    """Ray cluster address; default RAY_ADDRESS, else a local Ray."""
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    """fsspec options for `out`."""
    image_storage_options: Mapping[str, Any] = field(default_factory=dict)
    """fsspec options for `images`."""
    overwrite: bool = False
    """Delete an existing store at `out` with a different spec instead of refusing."""
    max_units: int | None = None
    """Stop after this many units (the store stays partial; rerun to finish)."""
    image_column: str | None = None
    """Parquet datasets: the column holding the images; default its datasets Image feature or only binary column."""
    label_column: str | None = None
    """The labels' column (parquet, list files) or a tar sample's member or .json field; default label / cls."""
    class_names: str | None = None
    """Text file naming integer labels, one per line; default the dataset's own names (class folders, the parquet's
    ClassLabel, the dataset card)."""
    masks: str | None = None
    """Folder of segmentation masks mirroring the images' paths (<masks>/<relative path>.png, single-channel class
    indices, 255 = ignore; <masks>/classes.txt names them, or ADE20K's objectInfo150 table, whose values are
    shifted: 0 -> 255, k -> k - 1): each patch's majority class goes into the store's labels array; images
    without a mask get 255. Read with image_storage_options."""
    mask_suffix: str | None = None
    """IMAGE_END:MASK_END pairs masks by name ending: an image's mask is <masks>/<its relative path with IMAGE_END
    replaced by MASK_END> (Cityscapes: _leftImg8bit.png:_gtFine_labelTrainIds.png); default <relative path minus
    extension>.png."""

    def __post_init__(self) -> None:
        if isinstance(self.layers, (int, str)):
            object.__setattr__(self, "layers", (self.layers,))
        object.__setattr__(self, "layers", tuple(self.layers))
        for name in ("batch_size", "images_per_shard", "max_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_actors is not None and self.num_actors < 1:
            raise ConfigError(f"num_actors must be >= 1, got {self.num_actors}")
        if self.max_actors is not None and self.max_actors < (self.num_actors or 1):
            raise ConfigError(f"max_actors must be >= num_actors, got {self.max_actors}")
        if self.mask_suffix is not None and self.masks is None:
            raise ConfigError("mask_suffix pairs images with masks: give masks too")
        parse_mask_suffix(self.mask_suffix)

    @property
    def backbone(self) -> BackboneConfig:
        return BackboneConfig(self.model, self.layers, self.pretrained, self.init_seed, self.trust_remote_code)


@dataclass(frozen=True)
class ExtractResult:
    """What a run did."""

    url: str
    n_images: int
    units_total: int
    units_written: int
    units_skipped: int
    images_written: int
    n_rejected: int
    seconds: float
    complete: bool
    n_unmasked: int = 0
    """Images written without a mask file (their patches are labelled 255); 0 without masks."""

    @property
    def images_per_second(self) -> float:
        return self.images_written / self.seconds if self.seconds > 0 else 0.0


def _decode_unit(batch: dict[str, np.ndarray], preprocessor: Preprocessor, max_pixels: int,
                 storage_options: Any, labeler: MaskLabeler | None = None) -> dict[str, np.ndarray]:
    """Fetch and decode one unit's images to uint8 (n, 3, H, W); bad images become rejected rows. With a
    labeler, also the unit's per-patch labels from its masks (n, n_patches) and how many images had none.
    `storage_options`: an object-store reference to the images' options (see the top)."""
    import ray

    options = ray.get(storage_options)
    uris = json.loads(batch["uris"][0])
    blobs = read_bytes(uris, options)
    if labeler is not None:
        masks = json.loads(batch["masks"][0])
        mask_blobs = read_bytes(masks, options)
        labels, n_unmasked = labeler.unlabeled(len(uris)), 0
    pixels = np.zeros((len(uris), 3, *preprocessor.image_size), np.uint8)
    rows: dict[str, list[Any]] = {"uri": uris, "label": json.loads(batch["labels"][0]), "width": [], "height": [],
                                  "status": [], "reason": [], **json.loads(batch["columns"][0])}
    for i, blob in enumerate(blobs):
        if isinstance(blob, Exception):
            w = h = 0
            status, reason = STATUS_REJECTED, f"unreadable: {type(blob).__name__}: {blob}"
        else:
            img = decode_image(blob, max_pixels)
            w, h, status, reason = img.width, img.height, img.status, img.reason
            if img.image is not None:
                pixels[i] = preprocessor(img.image).numpy()
                if labeler is not None and isinstance(mask_blobs[i], Exception):
                    n_unmasked += 1  # no mask file: its patches keep IGNORE
                elif labeler is not None:
                    labels[i] = labeler(mask_blobs[i], (w, h), masks[i])
        for key, value in zip(("width", "height", "status", "reason"), (w, h, status, reason)):
            rows[key].append(value)
    out = {"unit": batch["unit"], "pixels": pixels[None], "meta": np.array([json.dumps(rows)])}
    if labeler is not None:
        out.update(patch_labels=labels[None], n_unmasked=np.array([n_unmasked]))
    return out


class _Forward:
    """Actor: holds the backbone; runs one unit's ok images through it in mini-batches."""

    def __init__(self, backbone: BackboneConfig, batch_size: int, dtype: str, threads: int | None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_backbone(backbone).to(self.device)
        self.specs = self.model.layer_specs()
        self.batch_size, self.dtype = batch_size, dtype

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        unit, pixels = int(batch["unit"][0]), batch["pixels"][0]
        ok = np.flatnonzero(np.array(json.loads(batch["meta"][0])["status"]) == STATUS_OK)
        outs = {s.name: None for s in self.specs}
        for b in range(0, len(ok), self.batch_size):
            idx = ok[b:b + self.batch_size]
            x = torch.from_numpy(pixels[idx]).to(self.device, non_blocking=True)
            with torch.inference_mode():
                acts = self.model(x)
            for s in self.specs:
                stored = to_storage(acts[s.name], self.dtype, f"layer {s.name}, unit {unit}")
                if outs[s.name] is None:
                    outs[s.name] = np.zeros((len(pixels), *stored.shape[1:]), stored.dtype)
                outs[s.name][idx] = stored
        for s in self.specs:  # a unit whose images were all rejected
            if outs[s.name] is None:
                outs[s.name] = to_storage(torch.zeros(len(pixels), s.tokens.n_tokens, s.d), self.dtype, s.name)
        passed = {k: batch[k] for k in ("patch_labels", "n_unmasked") if k in batch}  # decode's, for the writer
        return {"unit": batch["unit"], "meta": batch["meta"], **passed,
                **{f"acts:{n}": a[None] for n, a in outs.items()}}


def _write_unit(batch: dict[str, np.ndarray], writer: StoreWriter) -> dict[str, np.ndarray]:
    unit = int(batch["unit"][0])
    rows = json.loads(batch["meta"][0])
    acts = {key.split(":", 1)[1]: value[0] for key, value in batch.items() if key.startswith("acts:")}
    import ray

    labels = batch["patch_labels"][0] if "patch_labels" in batch else None
    writer.write_unit(unit, acts, images=rows, labels=labels, node=ray.get_runtime_context().get_node_id())
    n_rejected = sum(s != STATUS_OK for s in rows["status"])
    return {"unit": batch["unit"], "n": np.array([len(rows["uri"])]), "n_rejected": np.array([n_rejected]),
            "n_unmasked": batch.get("n_unmasked", np.array([0]))}


def run_extract(cfg: ExtractConfig, progress: bool = True) -> ExtractResult:
    """Run (or resume) an extraction; returns counts and timing."""
    started = time.perf_counter()
    manifest = build_manifest(cfg.images, dict(cfg.image_storage_options), image_column=cfg.image_column,
                              label_column=cfg.label_column, class_names=cfg.class_names, progress=progress)
    backbone = load_backbone(cfg.backbone)  # on the driver: layer specs, transforms, metadata
    layers = backbone.layer_specs()
    dataset = {"source": manifest.source, "fingerprint": manifest.fingerprint,
               "class_names": list(manifest.class_names),
               **({"label_columns": list(manifest.label_columns)} if manifest.label_columns else {})}
    labeler, masks = None, []
    if cfg.masks is not None:
        if ImageRef.parse(manifest.uris[0]).kind != "file":
            raise ConfigError(f"--masks pairs mask files with image files; {cfg.images} keeps its images inside "
                              "parquet files or tar shards")
        options = dict(cfg.image_storage_options)
        masks = mask_uris(manifest.uris, cfg.images, cfg.masks, options, cfg.mask_suffix)
        classes = mask_classes(cfg.masks, options)
        labeler = MaskLabeler.create(backbone.preprocessor, layers[0].tokens.grid, classes.remap)
        dataset.update(classes.attrs())
    spec = StoreSpec(n_images=len(manifest), layers=layers, dtype=cfg.dtype, codec=cfg.codec,
                     images_per_shard=cfg.images_per_shard, backbone=backbone.metadata(), dataset=dataset,
                     has_labels=labeler is not None)
    refuse_local_paths_on_a_cluster(cfg.address, images=cfg.images, out=cfg.out,
                                    **({} if cfg.masks is None else {"masks": cfg.masks}))
    writer = StoreWriter.create(cfg.out, spec, dict(cfg.storage_options), overwrite=cfg.overwrite)
    fs, root = filesystem(writer.url, writer.storage_options)
    put_bytes(fs, f"{root}/{CONFIG_KEY}", config_json(cfg).encode())
    done = writer.units_done()
    todo = [k for k in range(spec.n_units) if k not in done]
    if cfg.max_units is not None:
        todo = todo[:cfg.max_units]
    n_todo = sum(spec.unit_range(k)[1] - spec.unit_range(k)[0] for k in todo)
    units = []
    for k in todo:
        a, b = spec.unit_range(k)
        units.append({"unit": k, "uris": json.dumps(manifest.uris[a:b]),
                      "labels": json.dumps([int(v) for v in manifest.labels[a:b]]),
                      "columns": json.dumps({n: c.values(a, b) for n, c in manifest.label_columns.items()}),
                      **({"masks": json.dumps(masks[a:b])} if labeler is not None else {})})
    preprocessor = backbone.preprocessor
    del backbone
    n_rejected = n_unmasked = 0
    if units:
        n_rejected, n_unmasked = _run(_pipeline(cfg, units, preprocessor, labeler, writer), n_todo, progress)
    complete = len(writer.units_done()) == spec.n_units
    if complete:
        writer.finalize()
    return ExtractResult(url=writer.url, n_images=spec.n_images, units_total=spec.n_units,
                         units_written=len(todo), units_skipped=len(done), images_written=n_todo,
                         n_rejected=n_rejected, seconds=time.perf_counter() - started, complete=complete,
                         n_unmasked=n_unmasked)


def _run(ds: Any, n_images: int, progress: bool) -> tuple[int, int]:
    """Iterate the pipeline to its end; returns the rejected and the unmasked images. A worker's error is raised
    as the project's error (user_error), once Ray Data's actors are gone: Ray Data releases them by reference
    counting, and the failure's traceback would hold them (and their CPUs) until a garbage collection."""
    n_rejected, n_unmasked, error = 0, 0, None
    try:
        with tqdm(total=n_images, desc="extract", unit="img", disable=not progress) as bar:
            for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                bar.update(int(out["n"].sum()))
                n_rejected += int(out["n_rejected"].sum())
                n_unmasked += int(out["n_unmasked"].sum())
    except Exception as e:
        error = user_error(e)
        if error is None:
            raise
        error.__traceback__ = error.__cause__ = error.__context__ = None  # nothing left pointing at `ds`
    if error is not None:
        del ds
        gc.collect()
        raise error
    return n_rejected, n_unmasked


def _pipeline(cfg: ExtractConfig, units: list[dict[str, Any]], preprocessor: Preprocessor,
              labeler: MaskLabeler | None, writer: StoreWriter) -> Any:
    """The Ray Data dataset: one row per unit, decode tasks -> forward actors -> write tasks."""
    import ray

    init_ray(cfg.address)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts images
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # a failing unit reaches the user as our error
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    low = cfg.num_actors or 1
    # GPUs: an autoscaling pool, one actor per GPU at most. CPU only: the forward pass dominates, so each
    # actor's torch uses its share of every core while reserving one CPU in Ray's accounting, which
    # leaves the rest for decode and write tasks
    pool = ray.data.ActorPoolStrategy(min_size=low, max_size=cfg.max_actors or max(low, gpus)) if gpus else \
        ray.data.ActorPoolStrategy(size=low)
    threads = None if gpus else max(1, cpus // low)
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    # the memory hint (a decoded unit, twice) is honest and keeps Ray Data from fusing decoding into
    # the forward actors, which would serialize the two on a CPU-only cluster too
    unit_bytes = cfg.images_per_shard * 3 * preprocessor.image_size[0] * preprocessor.image_size[1]
    ds = ds.map_batches(_decode_unit, batch_size=1, batch_format="numpy", memory=2 * unit_bytes,
                        fn_kwargs={"preprocessor": preprocessor, "max_pixels": cfg.max_pixels,
                                   "storage_options": ray.put(dict(cfg.image_storage_options)), "labeler": labeler})
    # Ray Data restarts forward actors and retries their tasks (at least once; units are idempotent)
    ds = ds.map_batches(_Forward, batch_size=1, batch_format="numpy",
                        compute=pool, num_gpus=1 if gpus else 0, num_cpus=1,
                        fn_constructor_kwargs={"backbone": cfg.backbone, "batch_size": cfg.batch_size,
                                               "dtype": cfg.dtype, "threads": threads})
    return ds.map_batches(_write_unit, batch_size=1, batch_format="numpy", fn_kwargs={"writer": writer})
