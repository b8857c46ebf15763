"""Steering: `run_steer(SteerConfig(sae=..., image=..., edit=[...], head=...))` edits SAE features inside the model
(sae.edits, spliced in error mode) and reads the model out before and after, through a head (services.steer.heads);
`Steerer` keeps the model loaded for the service's POST /steer."""

from services.steer.heads import HEAD_KINDS, ClassHead, Head, SegHead, VLMHead, build_head
from services.steer.run import FORMAT, SteerConfig, Steerer, run_steer

__all__ = ["FORMAT", "HEAD_KINDS", "ClassHead", "Head", "SegHead", "SteerConfig", "Steerer", "VLMHead", "build_head",
           "run_steer"]
