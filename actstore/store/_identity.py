"""Which model made a store, and whether an SAE belongs to it: one identity for the triple (backbone, store, SAE).

A store's attrs["backbone"] records what rebuilds its model: family, name, checkpoint (a tag, "hub", a file path or
null for random weights), init_seed, and for `hf:` the model class and config; since this record also holds
`weights` (what the weights resolved to when the store was made: the sha256 of a checkpoint file, the hub revision)
and `versions` (torch, timm, open_clip, transformers: what built the model).

    model_identity(attrs["backbone"])   {"model": "timm:vit_small...", "weights": "random, init seed 0", ...}
    identity_differences(a, b)          what differs between two identities, in words ([] when they agree)

An SAE records the identity of the store it was trained on (sae.checkpoint.origin); a command that puts it on a store
or back into a model compares the two. The dataset is not part of it: an SAE applied to another dataset of the same
model is fine. Library versions are not part of it either (an upgrade alone changes no weights); the fidelity check on
rebuild (services.fidelity) catches an upgrade that changes what the model computes, and names the versions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["describe_model", "identity_differences", "model_identity"]

_CHECKED_IF_BOTH = ("sha256", "tag", "revision", "config")
"""Compared only where both records have them (records written before they existed lack them)."""


def model_identity(backbone: Mapping[str, Any]) -> dict[str, Any]:
    """What two records must share to mean the same model (see the module docstring)."""
    checkpoint = backbone.get("checkpoint")
    weights = backbone.get("weights") or {}
    identity: dict[str, Any] = {"model": f"{backbone.get('family')}:{backbone.get('name')}"}
    if checkpoint is None:
        identity["weights"] = f"random, init seed {backbone.get('init_seed', 0)}"
        if backbone.get("config") is not None:  # hf: random weights drawn from this config
            canonical = json.dumps(backbone["config"], sort_keys=True, separators=(",", ":"))
            identity["config"] = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    elif weights.get("sha256"):
        identity["weights"] = "a checkpoint file"  # its bytes are the identity, not where it lay
    else:
        identity["weights"] = str(checkpoint)
    for key in ("sha256", "tag", "revision"):
        if weights.get(key):
            identity[key] = weights[key]
    return identity


def describe_model(identity: Mapping[str, Any]) -> str:
    """One line: "timm:vit_tiny_patch16_224 (random, init seed 0)", "... (sha256 3f2a...)"."""
    details = [identity.get("weights", "?")]
    details += [f"{key} {str(identity[key])[:12]}" for key in ("sha256", "tag", "revision") if identity.get(key)]
    return f"{identity.get('model')} ({', '.join(details)})"


def identity_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """["weights: random, init seed 0 vs random, init seed 1", ...]: the fields on which a and b disagree."""
    keys = ["model", "weights", *(k for k in _CHECKED_IF_BOTH if a.get(k) and b.get(k))]
    if a.get("sha256") and b.get("sha256"):
        keys.remove("weights")  # two copies of one checkpoint file, wherever each lay
    return [f"{k}: {a.get(k)} vs {b.get(k)}" for k in keys if a.get(k) != b.get(k)]
