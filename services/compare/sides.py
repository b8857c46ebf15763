"""The sides of a comparison (and the models of `actstore taskfit`): each an SAE on its store (an index folder or
SAE_DIR@STORE_URL), checked to be over the same images, and their dense latents read block by block in lockstep
(every side's block of the same images).

A side's value of a feature on an image is its largest over the image's patches, or its value on the CLS / pooled
token for an SAE trained on those (a ResNet's attnpool layer has only that token); at patch level every patch is a
row, and the sides need the same patch grid.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from actstore.config import redact
from actstore.errors import ConfigError
from actstore.store import ActivationStore, LayerSpec, is_local, normalize_url, ok_mask
from sae import SparseAutoencoder, TokenEncoder, positive_entries
from sae.checkpoint import load_on_store
from services.index.layout import META as INDEX_META
from services.index.layout import read_index_meta

if TYPE_CHECKING:
    from services.compare.run import CompareConfig  # check_pair reads its level and by

__all__ = ["Side", "check_pair", "common_images", "open_side", "side_rows"]


@dataclass(frozen=True)
class Side:
    """One side opened: its store, its tokens through its SAE (TokenEncoder), and where they came from."""

    source: str
    index: str | None
    sae_url: str
    encoder: TokenEncoder
    """On the layer the SAE was trained on: its patches (image value = max over patches) or its CLS / pooled token."""
    store: ActivationStore

    @property
    def sae(self) -> SparseAutoencoder:
        return self.encoder.sae

    @property
    def spec(self) -> LayerSpec:
        return self.encoder.spec

    @property
    def tokens(self) -> str:
        return self.encoder.tokens

    def rows(self, x: torch.Tensor, level: str, device: torch.device) -> torch.Tensor:
        """A block's activations (n_img, T, d) -> dense latents: (n_img, F) at image level, (n_img * P, F)
        at patch level."""
        rows, feats, vals = positive_entries(self.encoder.block(x))
        d_sae = self.sae.cfg.d_sae
        n_rows = x.shape[0] * self.encoder.per_image
        if level == "image" and self.tokens == "patches":
            rows, n_rows = rows // self.spec.tokens.n_patches, x.shape[0]
        dense = torch.zeros(n_rows * d_sae, device=device)
        return dense.scatter_reduce_(0, rows * d_sae + feats, vals, reduce="amax").view(n_rows, d_sae)

    def describe(self, fired: torch.Tensor | None = None) -> dict[str, Any]:
        """Where the side comes from (credentials redacted); with `fired` (rows per feature), its live and dead
        counts."""
        backbone = self.store.attrs.get("backbone", {})
        out = {"source": redact(self.source), "index": self.index, "sae": redact(self.sae_url),
               "store": redact(self.store.url), "layer": self.spec.name, "tokens": self.tokens,
               "d_sae": self.sae.cfg.d_sae, "backbone": {k: backbone.get(k) for k in ("family", "name")}}
        if fired is not None:
            live = int((fired > 0).sum())
            out.update(live=live, dead=self.sae.cfg.d_sae - live)
        return out


def open_side(spec: str, name: str, storage_options: dict[str, Any], device: torch.device,
              command: str = "compare") -> Side:
    """An index folder, or SAE_DIR@STORE_URL; `name` says which side it is (and `command` which command asks) in
    errors."""
    index = Path(normalize_url(spec)) if is_local(spec) else None
    if index is not None and (index / INDEX_META).is_file():
        meta = read_index_meta(index)
        sae_url, store_url, layer = meta["sae"], meta["store"], meta["layer"]
        index_path: str | None = str(index.resolve())
    elif "@" in spec:
        sae_url, store_url = spec.rsplit("@", 1)
        layer, index_path = None, None
    else:
        raise ConfigError(f"{command}: {name} ({redact(spec)}) is neither an index folder (no {INDEX_META}) nor "
                          "SAE_DIR@STORE_URL")
    store = ActivationStore(store_url, storage_options)
    sae, norm, layer_spec = load_on_store(sae_url, store, layer, device, storage_options)
    cls = norm is not None and norm.tokens == "cls" or layer_spec.tokens.n_patches == 0
    return Side(spec, index_path, sae_url, TokenEncoder(sae, norm, layer_spec, "cls" if cls else "patches"), store)


def common_images(sides: Sequence[Side], names: Sequence[str], command: str = "compare") -> np.ndarray:
    """The images every side may use (ok in all); refuses stores over different images, naming the first
    difference with the first side."""
    tables = [s.store.images() for s in sides]
    first = tables[0].column("uri").to_pylist()
    for table, name in zip(tables[1:], names[1:]):
        other = table.column("uri").to_pylist()
        if other != first:
            i = next((i for i, (x, y) in enumerate(zip(first, other)) if x != y), min(len(first), len(other)))
            shorter = min(len(first), len(other))
            what = (f"image {i} is {first[i]!r} in {names[0]} and {other[i]!r} in {name}" if i < shorter
                    else f"{names[0]} has {len(first)} images, {name} has {len(other)}")
            raise ConfigError(f"{command}: {names[0]} and {name} are not over the same images: {what}")
    ok = ok_mask(tables[0])
    for table in tables[1:]:
        ok &= ok_mask(table)
    return ok


def check_pair(cfg: CompareConfig, a: Side, b: Side, names: tuple[str, str] = ("A", "B")) -> None:
    """What a pair must share for cfg's level and similarity (a patch grid; one model's layer for decoders)."""
    if cfg.level == "patch":
        for side, name in zip((a, b), names):
            if side.tokens != "patches":
                raise ConfigError(f"compare: --level patch needs patch SAEs; {name} ({side.sae_url}) reads the "
                                  "CLS / pooled token")
        if a.spec.tokens.grid != b.spec.tokens.grid:
            raise ConfigError(f"compare: --level patch needs the same patch grid; {names[0]}'s layer {a.spec.name} is "
                              f"{'x'.join(map(str, a.spec.tokens.grid))}, {names[1]}'s layer {b.spec.name} is "
                              f"{'x'.join(map(str, b.spec.tokens.grid))}")
    if cfg.by == "decoder":
        ka, kb = (s.store.attrs.get("backbone", {}) for s in (a, b))
        model = ("family", "name", "checkpoint", "init_seed")
        if [ka.get(k) for k in model] != [kb.get(k) for k in model] or a.spec.name != b.spec.name:
            raise ConfigError(f"compare: --by decoder needs SAEs of the same layer of the same model; {names[0]} is "
                              f"layer {a.spec.name} of {ka.get('family')}:{ka.get('name')}, {names[1]} is layer "
                              f"{b.spec.name} of {kb.get('family')}:{kb.get('name')}")


def side_rows(sides: Sequence[Side], ok: np.ndarray, level: str, images_per_block: int, device: torch.device,
              desc: str, progress: bool) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """Every side's dense latents for the same rows, block by block: ([x_side (n, F_side)], row ids). Rejected
    images (in any store) are left out; patch-level row ids are image * n_patches + patch."""
    ok_t = torch.from_numpy(ok)
    bar = tqdm(total=len(ok), desc=desc, unit="image", unit_scale=True, disable=not progress)
    blocks = [s.store.blocks(s.spec.name, images_per_block, whole_chunks=True) for s in sides]
    with torch.inference_mode():
        for per_side in zip(*blocks):
            start, n_img = per_side[0][0], per_side[0][1].shape[0]
            keep = ok_t[start:start + n_img]
            images = torch.arange(start, start + n_img)
            xs = [s.rows(x, level, device) for s, (_, x) in zip(sides, per_side)]
            if level == "patch":
                p = sides[0].spec.tokens.n_patches
                keep = keep.repeat_interleave(p)
                images = (images.unsqueeze(1) * p + torch.arange(p)).reshape(-1)
            keep = keep.to(device)
            yield [x[keep] for x in xs], images.to(device)[keep]
            bar.update(n_img)
    bar.close()
