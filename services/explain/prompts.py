"""What the explainer and the judge are shown: images as the model saw them, and the two prompts.

An explainer sees a feature's top images with the patches where it fired at full brightness and the rest dimmed
(multiplied by DIM, as multimodal-sae highlights the active region), then a few weaker examples as they are, and is
asked for a short phrase. A judge sees one held-out image as it is, with the explanation quoted, and answers Yes or
No: the phrasing scores.py's detection relies on.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

from services.explain.backends import Prompt

__all__ = ["DIM", "explain_prompt", "highlighted", "judge_prompt", "phrase"]

DIM = 0.3
"""Brightness left to the patches where the feature did not fire."""
MAX_WORDS = 12


def highlighted(jpeg: bytes, heatmap: np.ndarray, grid: tuple[int, int]) -> bytes:
    """The image (JPEG, as the model saw it) with the patches where `heatmap` (n_patches,) is positive kept and the
    rest dimmed, as JPEG."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    fired = Image.fromarray((heatmap.reshape(grid) > 0).astype(np.uint8) * 255)
    mask = np.asarray(fired.resize(image.size, Image.Resampling.NEAREST), np.float32)[..., None] / 255
    pixels = np.asarray(image, np.float32) * (mask + (1 - mask) * DIM)
    out = io.BytesIO()
    Image.fromarray(pixels.round().astype(np.uint8)).save(out, "JPEG", quality=92)
    return out.getvalue()


def explain_prompt(top: list[bytes], weaker: list[bytes]) -> Prompt:
    """The explainer's prompt: the highlighted top images, then the weaker ones."""
    text = (f"These images show where one feature of a vision model fires. In the first {len(top)} images it fires "
            "most strongly: the region where it fires is bright and the rest is dimmed.")
    if weaker:
        text += f" In the last {len(weaker)} images it fires weakly (shown as they are)."
    text += (" What does the feature detect? Answer with one short phrase of at most ten words, naming what the "
             "bright regions share.")
    return Prompt(tuple(top) + tuple(weaker), text)


def judge_prompt(image: bytes, explanation: str) -> Prompt:
    """The judge's prompt for one held-out image."""
    text = ("A feature of a vision model is described by this explanation.\n"
            f'Explanation: "{explanation}"\n'
            "Does the feature fire on this image, that is, does the image contain what the explanation describes?\n"
            "Answer Yes or No.")
    return Prompt((image,), text)


def phrase(answer: str) -> str:
    """A VLM's answer as an explanation: its first non-empty line without quotes, list marks or a trailing full
    stop, at most MAX_WORDS words."""
    line = next((s.strip() for s in answer.splitlines() if s.strip()), "")
    line = re.sub(r"^(?:[-*\d.)\s]+|explanation:\s*)", "", line, flags=re.IGNORECASE).strip().strip("\"'`").strip()
    return " ".join(line.rstrip(".").split()[:MAX_WORDS])
