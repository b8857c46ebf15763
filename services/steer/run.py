"""`actstore steer`: what a model predicts for one image before and after editing SAE features inside it.

The SAE is spliced in error mode at its layer (services.spliced rebuilds the backbone from its store), so with no
edit the model is exactly the clean one, and an edit moves the layer's tokens by exactly its latents' change times
the decoder (sae.edits). "after" is always that spliced run, edits or not. The same `Steerer` serves the CLI and the
service's POST /steer; it holds the model, its heads and a lock (a splice is a hook on the shared model: one steered
run at a time). A run can be stopped from another thread (`cancel`): while it waits for the lock, between its
passes, and at a VLM's next generated token; it then raises Cancelled.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from actstore.config import check_at_least, public_config, redact
from actstore.errors import ActstoreError, ConfigError, NotFoundError
from actstore.extract.zeroshot import DEFAULT_TEMPLATE
from actstore.store import STATUS_OK, ActivationStore
from sae.edits import FeatureEdit, check_edits, edit_fn, parse_edit
from sae.splice import splice
from services.results import check_picture_path, check_result_path, write_picture, write_result
from services.spliced import SAEInModel, decode_images, load_in_model
from services.steer.heads import Head, build_head

__all__ = ["FORMAT", "Cancelled", "SteerConfig", "Steerer", "run_steer"]

FORMAT = "actstore-steer"
_POLL_S = 0.02
"""How often a run waiting for the model looks at its cancel."""


class Cancelled(ActstoreError, RuntimeError):
    """A steering run was stopped by its `cancel` (the service's time bound) before it finished."""


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("the steering run was stopped")


@dataclass(frozen=True)
class SteerConfig:
    """One steering run: an image through the SAE's backbone, read out by a head, before and after the edits."""

    sae: str
    """SAE folder (cfg.json + sae.safetensors); its store gives the backbone, weights and layer."""
    image: str
    """An image of the SAE's store by index (e.g. 12), or an image file's path or URL."""
    edit: tuple[str, ...] = ()
    """Feature edits FEATURE:OP:VALUE[@WHERE], OP one of scale, add, set, clamp (a ceiling), WHERE all (default:
    every token the SAE was trained on), cls, patches or comma-separated patch indices (row-major), e.g.
    --edit 12:set:0@all --edit 40:add:2.5@3,4. None: the clean model's output."""
    head: str = "model"
    """What to read out: model (the backbone's classifier), zeroshot[:FILE] (class names, one per line; default the
    store's classes), probe:DIR (from `actstore probe`: CLS classifier or segmentation), vlm[:MODEL], or
    generate[:PIPELINE[@ADAPTER]] (a diffusers pipeline conditioned on the backbone's image embedding: unCLIP,
    Kandinsky 2.2's decoder, Stable Diffusion with an IP-Adapter's weights file; see services.steer.generate)."""
    prompt: str | None = None
    """The question for a vlm head; the text prompt of a generate head's pipeline, where it reads one."""
    json: str | None = None
    """Write the result here (an existing file is replaced only if it is a steer result and overwrite is set)."""
    store: str | None = None
    """The store the SAE was trained on; default the one the SAE records."""
    layer: str | None = None
    """The store's layer the SAE reads; default the one it records. Another library's SAE that names no model we can
    map needs it (its layer is then checked, its model not)."""
    template: str = DEFAULT_TEMPLATE
    """Zero-shot prompt, {} is the class name."""
    top: int = 5
    """Classes listed per prediction."""
    responses: int = 5
    """Answers sampled from a vlm head."""
    temperature: float = 0.7
    """Sampling temperature of a vlm head (> 0)."""
    seed: int = 0
    """Seed of the vlm head's sampling: before and after sample with the same seed."""
    max_new_tokens: int = 24
    """Longest vlm answer, in tokens."""
    steps: int = 25
    """Denoising steps of a generate head."""
    guidance: float | None = None
    """Classifier-free guidance scale of a generate head; default the pipeline's own."""
    size: int | None = None
    """Height and width of a generate head's pictures, in pixels; default the pipeline's own."""
    images: str | None = None
    """Write a generate head's pictures to IMAGES.before.png and IMAGES.after.png (existing ones are replaced only if
    they are steer pictures and overwrite is set)."""
    device: str = "cpu"
    """Where the backbone and the SAE run (e.g. "cuda")."""
    fidelity_check: bool = True
    """Check first that the rebuilt backbone makes the store's activations (--no-fidelity-check skips it; the result
    then says so)."""
    overwrite: bool = False
    """Replace an existing steer result at `json`."""
    trust_remote_code: bool = False
    """Run the modeling code an hf: model ships (auto_map in its config.json: actstore.extract.remote_vlm); the store
    never records it, so each command that loads such a model needs it."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for the SAE, the store and the image."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "edit", tuple(str(e) for e in self.edit))
        check_at_least(self, "steer", {"top": 1, "responses": 1, "max_new_tokens": 1, "steps": 1})
        if self.size is not None and self.size < 8:
            raise ConfigError(f"steer: size must be >= 8, got {self.size}")
        if not self.temperature > 0:
            raise ConfigError(f"steer: temperature must be > 0, got {self.temperature}")


class Steerer:
    """An SAE inside its backbone, ready to steer: images by store index, heads by name, one run at a time."""

    def __init__(self, sae: str, store: str | None = None, device: str = "cpu",
                 storage_options: dict[str, Any] | None = None, template: str = DEFAULT_TEMPLATE,
                 fidelity_check: bool = True, layer: str | None = None, trust_remote_code: bool = False) -> None:
        self.storage_options = dict(storage_options or {})
        self.template = template
        self.model: SAEInModel = load_in_model(sae, store, device, self.storage_options, fidelity_check, layer,
                                               trust_remote_code)
        self.store = ActivationStore(self.model.store_url, self.storage_options)
        self.images = self.store.images()
        self.classes = list(self.store.attrs.get("dataset", {}).get("class_names", []))
        self.device = device
        self._heads: dict[str, Head] = {}
        self._lock = threading.Lock()

    @property
    def layout(self):  # noqa: ANN201 - TokenLayout
        return self.model.spec.tokens

    def head(self, spec: str) -> Head:
        """The head `spec` names, built once."""
        if spec not in self._heads:
            self._heads[spec] = build_head(spec, self.model, self.classes, self.template, self.storage_options)
        return self._heads[spec]

    def image(self, ref: int | str) -> torch.Tensor:
        """uint8 (1, 3, H, W): the store's image `ref` (an index) or the image file at `ref`."""
        if isinstance(ref, int) or str(ref).strip().isdigit():
            i = int(ref)
            if not 0 <= i < self.images.num_rows:
                raise NotFoundError(f"image {i}: the store has images 0..{self.images.num_rows - 1}")
            if self.images.column("status")[i].as_py() != STATUS_OK:
                raise NotFoundError(f"image {i} was rejected at extraction: {self.images.column('reason')[i].as_py()}")
            uri = self.images.column("uri")[i].as_py()
        else:
            uri = str(ref)
        pixels, rejected = decode_images(self.model.backbone, [uri], self.storage_options)
        if pixels is None:
            raise ConfigError(f"image {redact(rejected[0])}")
        return pixels.to(self.device)

    def edits(self, specs: Sequence[str | FeatureEdit]) -> list[FeatureEdit]:
        """Parsed and checked against the SAE's width and the layer's grid."""
        edits = [e if isinstance(e, FeatureEdit) else parse_edit(e) for e in specs]
        check_edits(edits, self.model.sae.cfg.d_sae, self.layout)
        return edits

    def patch_features(self, i: int, patch: int) -> list[tuple[int, float]]:
        """(feature, activation) of the SAE on the stored token of patch `patch` of image `i`, strongest first."""
        layout = self.layout
        if not 0 <= i < self.images.num_rows:
            raise NotFoundError(f"image {i}: the store has images 0..{self.images.num_rows - 1}")
        if not 0 <= patch < layout.n_patches:
            raise ConfigError(f"patch {patch}: the grid is {layout.grid[0]} x {layout.grid[1]} "
                              f"(patches 0..{layout.n_patches - 1})")
        token = self.store.read(self.model.layer, i, i + 1)[0, int(layout.cls) + patch][None]
        acts = self.model.encoder().encode(token)
        dense = (acts.to_dense() if hasattr(acts, "to_dense") else acts)[0].float().cpu()
        active = torch.nonzero(dense > 0).flatten()
        order = dense[active].argsort(descending=True)
        return [(int(f), float(dense[f])) for f in active[order]]

    @contextmanager
    def _model_held(self, cancel: threading.Event | None) -> Iterator[None]:
        """The model to this run alone (waiting, stoppable, while another run has it)."""
        if cancel is None:
            self._lock.acquire()
        else:
            while not self._lock.acquire(timeout=_POLL_S):
                _check(cancel)
        try:
            yield
        finally:
            self._lock.release()

    def steer(self, images: torch.Tensor, edits: Sequence[FeatureEdit], head: Head,
              cancel: threading.Event | None = None, **options: Any) -> dict[str, Any]:
        """{"before": ..., "after": ...} of `head` on `images`: the clean model, and the model with the SAE spliced in
        with `edits` (none: the spliced model, which is the clean one). Edits the head cannot see are refused first;
        a set `cancel` stops the run at its next check (Cancelled)."""
        head.check(edits)
        m = self.model
        with self._model_held(cancel):
            _check(cancel)
            before = head.predict(images, cancel=cancel, **options)
            _check(cancel)  # also: a VLM's answers cut short by the cancel are not answers
            with splice(m.backbone, m.sae, m.norm, layer=m.layer, tokens="all", mode="error",
                        edit=edit_fn(edits, self.layout, m.tokens)):
                after = head.predict(images, cancel=cancel, **options)
            _check(cancel)
        out = {"before": before, "after": after}
        if "embedding" in before:  # a generate head: how far the edits moved the image embedding
            out["cosine"] = float(torch.nn.functional.cosine_similarity(
                torch.tensor(before["embedding"], dtype=torch.float64),
                torch.tensor(after["embedding"], dtype=torch.float64), dim=0))
        return out


def run_steer(cfg: SteerConfig) -> dict[str, Any]:
    """Steer one image; returns the result (also written to cfg.json when given)."""
    check_result_path(cfg.json, FORMAT, "a steer result", cfg.overwrite, cfg.storage_options)
    for side in ("before", "after") if cfg.images else ():
        check_picture_path(f"{cfg.images}.{side}.png", cfg.overwrite, cfg.storage_options)
    steerer = Steerer(cfg.sae, cfg.store, cfg.device, cfg.storage_options, cfg.template, cfg.fidelity_check,
                      cfg.layer, cfg.trust_remote_code)
    edits = steerer.edits(cfg.edit)
    head = steerer.head(cfg.head)
    if cfg.images and head.kind != "generate":
        raise ConfigError(f"--images: the {head.name} head makes no pictures; it is for generate heads")
    images = steerer.image(cfg.image)
    started = time.perf_counter()
    out = steerer.steer(images, edits, head, top=cfg.top, prompt=cfg.prompt, n=cfg.responses,
                        temperature=cfg.temperature, seed=cfg.seed, max_new_tokens=cfg.max_new_tokens,
                        steps=cfg.steps, guidance=cfg.guidance, size=cfg.size)
    m = steerer.model
    result = {"format": FORMAT, "image": cfg.image if not cfg.image.strip().isdigit() else int(cfg.image),
              "head": head.name, "kind": head.kind, "classes": head.classes, "edits": [str(e) for e in edits],
              **out, "prompt": cfg.prompt, "seconds": time.perf_counter() - started,
              "backbone": m.backbone.cfg.model, "layer": m.layer, "tokens": m.tokens, "grid": list(steerer.layout.grid),
              "d_sae": m.sae.cfg.d_sae, "store": redact(m.store_url), "fidelity": m.fidelity.to_dict(),
              "config": public_config(cfg)}
    if cfg.images:
        for side in ("before", "after"):
            write_picture(f"{cfg.images}.{side}.png", out[side]["image"], cfg.storage_options)
    if cfg.json is not None:
        write_result(cfg.json, result, cfg.storage_options)
    return result
