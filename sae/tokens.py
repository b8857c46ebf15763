"""A store's tokens through an SAE, the one way every stage does it (the index, the comparison, splicing, steering).

    enc = TokenEncoder(sae, norm, spec, tokens="patches")
    acts = enc.block(x)              # x (images, layer tokens, d) as the store reads it -> latents, rows (image, token)
    acts = enc.encode(tokens)        # tokens (n, d) in any dtype and device -> latents

The order is the trainer's: the tokens go to the SAE's device as float32, the input normalization (the loader's
transform) is applied in float32, and only then are they cast to the SAE's dtype and encoded. A bfloat16 SAE thus
sees the same inputs in training, in the index and inside the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from actstore.errors import ConfigError
from actstore.loader import Normalization
from actstore.store import LayerSpec, TokenLayout
from sae.acts import SparseActs
from sae.model import SparseAutoencoder

__all__ = ["BLOCK_BYTES", "BLOCK_TOKENS", "TOKENS", "Latents", "TokenEncoder", "token_positions"]

TOKENS = ("patches", "cls", "all")
BLOCK_TOKENS = 32768
BLOCK_BYTES = 4 << 30
"""A pass encodes at most BLOCK_TOKENS tokens and BLOCK_BYTES of encoder working memory at once, whatever its budget
allows (TokenEncoder.most_images): the GEMM runs no faster on more, and the index's merges, which cost F x k a block
whatever its size, are a small share by then (at 65,536 features: 1,170 patches/s with 4 GiB blocks, 1,070 with
1 GiB, bench_scale); the memory a pass takes stays flat in the number of images, not grown to fill a large budget."""
Latents = Tensor | SparseActs


def token_positions(layout: TokenLayout, tokens: str) -> Tensor:
    """The layout indices of one token kind, e.g. 1..196 for "patches" of a CLS + 14 x 14 layout."""
    if tokens not in TOKENS:
        raise ConfigError(f"tokens must be one of {', '.join(TOKENS)}, got {tokens!r}")
    cls = int(layout.cls)
    if tokens == "cls" and not layout.cls or tokens == "patches" and not layout.n_patches:
        raise ConfigError(f"this layer has no {tokens} tokens (layout: CLS {layout.cls}, grid {layout.grid})")
    start, stop = {"cls": (0, cls), "patches": (cls, layout.n_tokens), "all": (0, layout.n_tokens)}[tokens]
    return torch.arange(start, stop)


@dataclass(frozen=True)
class TokenEncoder:
    """An SAE behind its input normalization, on one layer's tokens of one kind (see the module docstring)."""

    sae: SparseAutoencoder
    norm: Normalization | None
    spec: LayerSpec
    tokens: str = "patches"
    """The token kind `block` encodes: "patches", "cls" or "all"."""

    def __post_init__(self) -> None:
        token_positions(self.spec.tokens, self.tokens)  # refuse a kind the layer lacks, once

    @property
    def per_image(self) -> int:
        """Rows `block` makes per image."""
        return int(token_positions(self.spec.tokens, self.tokens).numel())

    def token_bytes(self) -> int:
        """Peak working bytes of encoding one token, for memory budgets: the dense pre-activation row in the SAE's
        dtype; for the kinds encoded through a threshold (relu, jumprelu, batchtopk at inference) the masks and a
        float32 copy beside it; and the positive entries (k of them, or at most a fifth of the latents)."""
        cfg = self.sae.cfg
        pre = cfg.d_sae * self.sae.W_enc.element_size() + 4 * self.spec.d
        entries = 48 * (cfg.k if cfg.sparse else cfg.d_sae // 5)
        return pre + entries + (0 if cfg.kind == "topk" else 6 * cfg.d_sae)

    def most_images(self) -> int:
        """The most images worth encoding at once (BLOCK_TOKENS, BLOCK_BYTES), at least one."""
        return max(1, min(BLOCK_TOKENS // self.per_image, BLOCK_BYTES // (self.per_image * self.token_bytes())))

    def weight_bytes(self) -> int:
        """Bytes of the SAE's parameters (a fixed part of every budget)."""
        return sum(p.numel() * p.element_size() for p in self.sae.parameters())

    def prepare(self, x: Tensor) -> Tensor:
        """Tokens (n, d) -> the SAE's input: on its device, normalized in float32, in its dtype."""
        p = self.sae.W_enc
        x = x.to(device=p.device, dtype=torch.float32)
        if self.norm is not None:
            x = self.norm.apply(x)
        return x.to(p.dtype)

    def encode(self, x: Tensor) -> Latents:
        """Tokens (n, d) -> latents (dense for relu/jumprelu, SparseActs for the topk kinds)."""
        with torch.no_grad():
            return self.sae.encode(self.prepare(x))

    def block(self, x: Tensor) -> Latents:
        """A block as the store reads it (images, the layer's tokens, d) -> the latents of its tokens of this kind,
        rows ordered (image, token)."""
        first, n = {"patches": (int(self.spec.tokens.cls), self.spec.tokens.n_patches),
                    "cls": (0, 1), "all": (0, self.spec.tokens.n_tokens)}[self.tokens]
        return self.encode(x[:, first:first + n].reshape(-1, x.shape[-1]))
