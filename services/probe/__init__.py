"""Linear probes on a store's tokens: `train_probe(ProbeConfig(store=..., task="cls"|"seg", out=...))` fits one on a
layer's CLS (or mean-pooled) tokens or its patch tokens and measures it on held-out images (services.probe.train);
`load_probe(folder).logits(tokens)` runs it on a layer's raw tokens (services.probe.model)."""

from services.probe.model import FORMAT, FORMAT_VERSION, TASKS, Probe, load_probe, read_probe_meta
from services.probe.rows import split_rows
from services.probe.train import ProbeConfig, train_probe

__all__ = ["FORMAT", "FORMAT_VERSION", "TASKS", "Probe", "ProbeConfig", "load_probe", "read_probe_meta",
           "split_rows", "train_probe"]
