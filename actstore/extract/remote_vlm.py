"""VLMs that ship their own modeling code (`auto_map` in config.json: Phi-3.5-vision, Moondream 2, ...), loaded
only when the command is given `--trust-remote-code` (BackboneConfig.trust_remote_code; never recorded in a store,
so every command that loads one needs the flag again).

Their code is not ours to read, so the Backbone is found by a rule:

- the whole model is the auto_map's class (AutoModelForCausalLM, else AutoModelForImageTextToText, AutoModel);
- its vision tower is the one outermost submodule that is a transformers CLIPVisionModel or SiglipVisionModel
  (Phi-3.5-vision's `model.vision_embed_tokens.img_processor`); a model with none, or several, is refused in one
  line: a tower the model computes functionally (Moondream 2's vision blocks are weights its own functions apply,
  not modules it calls) could not be hooked anyway;
- its language model reads the layer the config names: `img_processor: {"layer_idx": i, "type_feature": t}`
  (Phi-3.5-vision's; i a hidden_states index, t "patch" drops the CLS token; -2 and "patch" where the dict leaves
  them out, as Phi-3-vision's own code defaults them), else LLaVA's `vision_feature_layer` /
  `vision_feature_select_strategy`, else the tower's last layer;
- prompts go through its processor (AutoProcessor, its chat template, else "{image}\\n{prompt}"), and generate takes
  input_ids, attention_mask and the Backbone's pixels; a processor whose pixels for one image have another shape
  (Phi-3.5-vision's HD crops) is refused when answers are asked for (extraction still works).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from actstore.errors import ConfigError
from actstore.extract.vlm_kinds import ReadLayer, VLMKind, hidden_state_block, llava_read

__all__ = ["REMOTE_CLASSES", "TOWER_CLASSES", "needs_remote_code", "remote_kind", "remote_model_class"]

REMOTE_CLASSES = ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModel")
"""auto_map entries a remote VLM's whole model is taken from, the first present."""
TOWER_CLASSES = ("CLIPVisionModel", "SiglipVisionModel")
"""The transformers vision towers a remote VLM's tower is found as."""


def needs_remote_code(config: dict[str, Any], native: set[str] | dict[str, Any]) -> bool:
    """Whether a config.json's model ships code we would run: it has an auto_map and its model type is none that
    transformers loads here natively (`native`)."""
    return bool(config.get("auto_map")) and config.get("model_type") not in native


def remote_model_class(config: Any, where: str) -> Any:
    """The whole model's class from the config's auto_map (its code imported from `where`)."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    auto_map = getattr(config, "auto_map", None) or {}
    for name in REMOTE_CLASSES:
        if name in auto_map:
            ref = auto_map[name]
            return get_class_from_dynamic_module(ref[0] if isinstance(ref, (list, tuple)) else ref, where)
    raise ConfigError(f"{where}: its auto_map names none of {', '.join(REMOTE_CLASSES)}")


def _read(config: Any, n_blocks: int) -> ReadLayer:
    spec = getattr(config, "img_processor", None)
    if isinstance(spec, dict):  # Phi-3/3.5-vision: hidden_states[layer_idx], -2 and "patch" where the config is silent
        i, feature = spec.get("layer_idx", -2), spec.get("type_feature", "patch")
        return ReadLayer(hidden_state_block(i, n_blocks), f"img_processor layer_idx {i}", feature == "patch",
                         f"img_processor type_feature {feature!r}")
    if getattr(config, "vision_feature_layer", None) is not None:
        return llava_read(config, n_blocks)
    return ReadLayer(n_blocks - 1, "no layer named in its config: the tower's last")


def remote_kind(model: nn.Module, name: str) -> tuple[VLMKind, nn.Module]:
    """(the VLMKind of a remote VLM, its vision tower): the one outermost submodule of `model` that is a
    TOWER_CLASSES instance, else a one-line ConfigError naming what was found."""
    import transformers

    classes = tuple(getattr(transformers, c) for c in TOWER_CLASSES)
    found: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if isinstance(module, classes) and not any(path.startswith(f"{p}.") for p, _ in found):
            found.append((path, module))
    if len(found) != 1:
        what = ", ".join(f"{p} ({type(m).__name__})" for p, m in found) or "none"
        raise ConfigError(f"{name}: its remote code's vision tower must be one {' or '.join(TOWER_CLASSES)} "
                          f"submodule (a tower computed functionally cannot be hooked); found {what}")
    path, tower = found[0]
    kind = VLMKind(type(model).__name__, path, ("clip_vision_model", "siglip_vision_model"), _read, "{image}\n{prompt}")
    return kind, tower
