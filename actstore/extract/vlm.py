"""A vision-language model's answers to a prompt about an image, sampled through the Backbone's own modules.

An `hf:` VLM backbone (actstore.extract.hf; the families: actstore.extract.vlm_kinds) is the VLM's vision tower and
keeps the whole VLM (`backbone.vlm`);
the tower inside it is the very module the Backbone hooks, so whatever is open on one of its layers (an
intervention, an SAE spliced in) acts on the answers:

    clean = responses(backbone, image, "What is in the picture?")
    with splice(backbone, sae, norm, layer=-2, edit=edit):
        steered = responses(backbone, image, "What is in the picture?")

The image goes in as `backbone.normalize(images)`, the pixels extraction and splicing see; the prompt is written
with the source's processor (its chat template where it has one, else its family's format: vlm_kinds.generate_inputs)
and the answers are sampled by the VLM's own
`generate` (its generation config, with sampling on at the given temperature). `stop`, a function of no arguments
that generate asks after every token, ends the generation early when it returns true (the steering service's time
bound): the answers are then cut short.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from actstore.errors import ConfigError
from actstore.extract.hooked import Backbone
from actstore.extract.vlm_kinds import FALLBACK_PROMPT, generate_inputs

__all__ = ["FALLBACK_PROMPT", "responses"]


def _check(backbone: Backbone, images: Tensor, prompt: str, n: int, temperature: float, max_new_tokens: int) -> None:
    if getattr(backbone, "vlm", None) is None:
        raise ConfigError(f"{backbone.cfg.model} is not a vision-language model; responses need an hf: VLM")
    if backbone.processor is None:
        raise ConfigError(f"{backbone.cfg.model} has no processor (tokenizer) to write the prompt with")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError("the prompt is empty")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    for name, value in (("n", n), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    size = tuple(backbone.preprocessor.image_size)
    if images.dtype != torch.uint8 or tuple(images.shape) != (1, 3, *size):
        raise ConfigError(f"images must be one uint8 (1, 3, {size[0]}, {size[1]}) image as the backbone's "
                          f"preprocessor makes it, got {images.dtype} {tuple(images.shape)}")


def _stopping(stop: Callable[[], bool] | None) -> dict[str, Any]:
    """generate's stopping_criteria for `stop` (asked once per generated token, for all sequences at once)."""
    if stop is None:
        return {}
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stop(StoppingCriteria):
        def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: Any) -> Tensor:
            return torch.full((input_ids.shape[0],), bool(stop()), dtype=torch.bool, device=input_ids.device)

    return {"stopping_criteria": StoppingCriteriaList([Stop()])}


def responses(backbone: Backbone, images: Tensor, prompt: str, *, n: int = 5, temperature: float = 0.7, seed: int = 0,
              max_new_tokens: int = 24, stop: Callable[[], bool] | None = None) -> list[str]:
    """The VLM's `n` sampled answers to `prompt` about the image (uint8 (1, 3, H, W), as `backbone.preprocessor`
    makes it), without the prompt and special tokens. The same seed gives the same answers (the caller's RNG is
    left as it was); the interventions open on `backbone` act on them. `stop()` true ends generation at the next
    token."""
    _check(backbone, images, prompt, n, temperature, max_new_tokens)
    processor, vlm = backbone.processor, backbone.vlm
    device = next(backbone.model.parameters()).device
    vlm.to(device)
    # the processor expands the image token to one per image feature; its own pixels are not used
    inputs = generate_inputs(backbone, images, prompt)
    tokenizer, config = processor.tokenizer, vlm.generation_config
    pad = {} if config.pad_token_id is not None else {
        "pad_token_id": tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = vlm.generate(**inputs, do_sample=True, temperature=float(temperature), max_new_tokens=max_new_tokens,
                           num_return_sequences=n, **pad, **_stopping(stop))
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in answers]
