"""What a steered model is read out through: class heads (the model's classifier, zero-shot, a CLS probe), a
segmentation probe, or a vision-language model's answers.

    model           the backbone's own classifier (timm)
    zeroshot[:FILE] a zero-shot classifier from class prompts (open_clip / transformers CLIP and SigLIP text towers);
                    FILE holds the class names, one per line (default: the store's dataset classes)
    probe:DIR       a probe from `actstore probe`: a CLS classifier, or a per-patch segmentation head
    vlm[:MODEL]     a VLM whose vision tower is the store's backbone (LLaVA, ...: actstore.extract.vlm_kinds): sampled
                    answers to a prompt
    generate[:PIPELINE[@ADAPTER]]
                    a diffusers pipeline conditioned on the image embedding of the store's backbone (the pipeline's
                    CLIP image encoder): the picture it generates (services.steer.generate)

Every head runs the whole model from the image, so whatever is spliced in while it runs acts on its output. A head
refuses edits that cannot reach its output (`check`, before any work): a VLM's language model reads the vision tower
at one layer (actstore.extract.vlm_kinds.read_layer: LLaVA's vision_feature_layer) and may drop tokens there (LLaVA's
vision_feature_select_strategy "default" drops the first, CLS), so an SAE on a later layer, or edits only of dropped
tokens at the layer it reads, change nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from actstore.errors import ConfigError
from actstore.extract.vlm_kinds import read_layer
from actstore.extract.zeroshot import DEFAULT_TEMPLATE, read_names, zero_shot_classifier
from sae.edits import FeatureEdit, edited_tokens
from services.spliced import SAEInModel
from services.steer.generate import GenerateHead, generate_head

__all__ = ["HEAD_KINDS", "ClassHead", "Head", "SegHead", "VLMHead", "build_head"]

HEAD_KINDS = ("model", "zeroshot", "probe", "vlm", "generate")


EditCheck = Callable[[Sequence[FeatureEdit]], None]
"""Refuses (ConfigError, one line) edits a head cannot see."""


def _any_edit(edits: Sequence[FeatureEdit]) -> None:
    """Class and segmentation heads read the model's last layers: every edit can reach them."""


def _top(probs: Tensor, k: int) -> list[list[float]]:
    """[[class index, probability], ...] of the k most probable classes, most probable first."""
    values, indices = probs.double().topk(min(k, probs.numel()))
    return [[int(i), float(v)] for i, v in zip(indices, values)]


@dataclass(frozen=True)
class ClassHead:
    """One label per image: top classes and their probabilities."""

    name: str
    classes: list[str]
    logits: Callable[[Tensor], Tensor] = field(repr=False)
    """uint8 images (B, 3, H, W) -> (B, n_classes)."""
    kind: str = "class"
    check: EditCheck = field(default=_any_edit, repr=False)

    def predict(self, images: Tensor, top: int = 5, **_: Any) -> dict[str, Any]:
        return {"top5": _top(self.logits(images)[0].float().softmax(-1), top)}


@dataclass(frozen=True)
class SegHead:
    """One label per patch: the mask (grid of labels) and the top classes of the patches' mean probability."""

    name: str
    classes: list[str]
    logits: Callable[[Tensor], Tensor] = field(repr=False)
    """uint8 images (B, 3, H, W) -> (B, n_patches, n_classes)."""
    grid: tuple[int, int]
    kind: str = "seg"
    check: EditCheck = field(default=_any_edit, repr=False)

    def predict(self, images: Tensor, top: int = 5, **_: Any) -> dict[str, Any]:
        probs = self.logits(images)[0].float().softmax(-1)
        return {"top5": _top(probs.mean(0), top), "mask": probs.argmax(-1).reshape(self.grid).tolist()}


@dataclass(frozen=True)
class VLMHead:
    """Sampled answers of a vision-language model to a prompt (seeded: the same edits give the same answers)."""

    name: str
    answer: Callable[..., list[str]] = field(repr=False)
    """(uint8 images (1, 3, H, W), prompt, n=, temperature=, seed=, max_new_tokens=, stop=) -> n answers."""
    classes: list[str] = field(default_factory=list)
    kind: str = "vlm"
    check: EditCheck = field(default=_any_edit, repr=False)

    def predict(self, images: Tensor, prompt: str | None = None, n: int = 5, temperature: float = 0.7,
                seed: int = 0, max_new_tokens: int = 24, cancel: Any = None, **_: Any) -> dict[str, Any]:
        """`cancel` (a threading.Event): once set, generation stops at its next token (the answers are then cut
        short: the caller discards them)."""
        if not prompt:
            raise ConfigError("a vlm head needs a prompt (--prompt)")
        return {"responses": self.answer(images, prompt, n=n, temperature=temperature, seed=seed,
                                         max_new_tokens=max_new_tokens, stop=None if cancel is None else cancel.is_set)}


Head = ClassHead | SegHead | VLMHead | GenerateHead


def _model_head(m: SAEInModel, classes: list[str]) -> ClassHead:
    probe = m.backbone.outputs(torch.zeros(1, 3, *m.backbone.preprocessor.image_size, dtype=torch.uint8))[1]
    if probe is None:
        raise ConfigError(f"{m.backbone.cfg.model} has no classifier of its own; use zeroshot[:FILE] or probe:DIR")
    names = classes if len(classes) == probe.shape[-1] else [str(i) for i in range(probe.shape[-1])]
    return ClassHead("model", names, lambda x: m.backbone.outputs(x)[1])


def _zeroshot_head(m: SAEInModel, arg: str, classes: list[str], template: str,
                   storage_options: dict[str, Any]) -> ClassHead:
    names = read_names(arg, storage_options) if arg else classes
    if not names:
        raise ConfigError("zeroshot: the store records no class names; name a file of them: zeroshot:FILE")
    head = zero_shot_classifier(m.backbone.cfg, names, template)  # on the CPU: (1, d) embeddings go to it
    return ClassHead("zeroshot", names, lambda x: head(m.backbone.outputs(x)[0].cpu()))


def _probe_head(m: SAEInModel, arg: str, storage_options: dict[str, Any]) -> ClassHead | SegHead:
    from services.probe import load_probe

    if not arg:
        raise ConfigError("probe head needs its folder: probe:DIR (from `actstore probe`)")
    probe = load_probe(arg, storage_options)
    spec = m.backbone.spec(probe.layer)
    if spec.index < m.spec.index:
        raise ConfigError(f"the probe reads layer {spec.name}, before the SAE's layer {m.layer}: edits there cannot "
                          "reach it")
    name = f"probe:{arg.rstrip('/').rsplit('/', 1)[-1]}"

    def logits(x: Tensor) -> Tensor:
        return probe.logits(m.backbone(x, layers=[spec.name])[spec.name].float())
    if probe.task == "seg":
        return SegHead(name, list(probe.class_names), logits, tuple(spec.tokens.grid))
    return ClassHead(name, list(probe.class_names), logits)


def _vlm_head(m: SAEInModel, arg: str) -> VLMHead:
    if getattr(m.backbone, "vlm", None) is None:
        raise ConfigError(f"{m.backbone.cfg.model} is not a vision-language model's vision tower; a vlm head steers "
                          "the VLM whose vision tower the SAE's store was extracted from")
    own = {m.backbone.cfg.arch, m.backbone.cfg.model, m.backbone.cfg.pretrained}
    if arg and arg not in own and f"hf:{arg}" not in own:
        raise ConfigError(f"vlm:{arg}: the SAE's store was extracted from {m.backbone.cfg.model}; a vlm head runs "
                          "that same model")
    from actstore.extract.vlm import responses

    return VLMHead("vlm", lambda x, prompt, **kw: responses(m.backbone, x, prompt, **kw), check=_vlm_reach(m))


def _vlm_reach(m: SAEInModel) -> EditCheck:
    """Refuses an SAE after the last layer the language model reads; returns the check that refuses edits only of
    tokens its projector drops, when the SAE sits at that very layer (at an earlier one, the tower's attention
    carries an edit of any token to the tokens it keeps)."""
    read = read_layer(m.backbone)
    last = read.index
    if m.spec.index > last:
        where = f"layer {m.backbone.spec(last).name}" if last >= 0 else "the embeddings"
        raise ConfigError(f"the SAE's layer {m.layer} comes after {where}, the last the language model reads "
                          f"({read.rule}): edits there cannot change its answers; use an SAE on that layer or an "
                          "earlier one")
    if m.spec.index < last or not read.drops_first:
        return _any_edit
    layout = m.spec.tokens
    dropped = "the CLS token" if layout.cls else "patch 0"

    def check(edits: Sequence[FeatureEdit]) -> None:
        for e in edits:
            reached = edited_tokens(e, layout, m.tokens)
            if reached.numel() and bool((reached == 0).all()):
                raise ConfigError(f"edit {e}: the language model never sees {dropped} at layer {m.layer} (its "
                                  f"projector drops the first token there: {read.drop_rule}); edit patches instead")
    return check


def build_head(spec: str, m: SAEInModel, classes: list[str] | None = None, template: str = DEFAULT_TEMPLATE,
               storage_options: dict[str, Any] | None = None) -> Head:
    """The head `spec` names (see the module docstring), over the backbone `m` splices into; `classes` are the
    store's class names, the default of zero-shot heads and the names of the model's own classes."""
    kind, _, arg = spec.strip().partition(":")
    options, names = storage_options or {}, list(classes or [])
    if kind == "model" and not arg:
        return _model_head(m, names)
    if kind == "zeroshot":
        return _zeroshot_head(m, arg, names, template, options)
    if kind == "probe":
        return _probe_head(m, arg, options)
    if kind == "vlm":
        return _vlm_head(m, arg)
    if kind == "generate":
        return generate_head(m, arg)
    raise ConfigError(f"head {spec!r}: expected model, zeroshot[:FILE], probe:DIR, vlm[:MODEL] or "
                      "generate[:PIPELINE[@ADAPTER]]")
