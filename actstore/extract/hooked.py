"""What every backbone family shares: a frozen model whose forward returns the requested layers' tokens.

`Backbone` resolves layers, hooks the chosen blocks (stopping the forward after the last one), normalizes
uint8 images on the model's device and records what the store needs; `ViT` turns [prefix tokens, patches]
sequences into the token layout (CLS kept, registers dropped). A `Family` (actstore.extract.backbones for
open_clip and timm, actstore.extract.hf for transformers) checks names and creates the models.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata as importlib_metadata
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import Tensor, nn

from actstore.errors import ConfigError
from actstore.extract.preprocess import Preprocessor
from actstore.store import LayerSpec, TokenLayout

if TYPE_CHECKING:
    from actstore.extract.backbones import BackboneConfig

__all__ = ["CHECKPOINT_SUFFIXES", "HUB_WEIGHTS", "LIBRARIES", "Backbone", "Family", "Head", "ViT", "checkpoint_path",
           "file_sha256", "library_versions", "seeded"]

HUB_WEIGHTS = "hub"
"""`pretrained` value that asks for the architecture's default pretrained weights (timm's, the hub id's)."""
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz")


def checkpoint_path(pretrained: str | None) -> str | None:
    """The absolute path when `pretrained` names a local file rather than a hub tag."""
    if not pretrained:
        return None
    p = os.path.expanduser(pretrained)
    if os.sep in p or "/" in p or p.endswith(CHECKPOINT_SUFFIXES) or os.path.exists(p):
        return os.path.abspath(p)
    return None


LIBRARIES = ("torch", "torchvision", "timm", "open_clip_torch", "transformers", "actstore")
"""The distributions whose versions a store records: what built the model and its preprocessing."""


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def file_sha256(path: str) -> str:
    """sha256 of a checkpoint file, or of a model folder's weight files (names and bytes, in name order)."""
    digest = hashlib.sha256()
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith(CHECKPOINT_SUFFIXES))
        files = [os.path.join(path, n) for n in names]
    else:
        names, files = [], [path]
    for name, file in zip(names or [""] * len(files), files):
        digest.update(name.encode())
        with open(file, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def _cached_revision(repo_id: str) -> str | None:
    """The commit of `repo_id`'s main branch in the local Hugging Face cache (what a download resolved to)."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        ref = os.path.join(HF_HUB_CACHE, f"models--{repo_id.replace('/', '--')}", "refs", "main")
        with open(ref) as f:
            return f.read().strip() or None
    except (ImportError, OSError):
        return None


def seeded(seed: int, create: Callable[..., nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
    """Create a model under a fixed seed; the caller's RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create(*args, **kwargs)


Head = Callable[[Tensor], tuple[Tensor, Tensor | None]]
"""The model's own end: normalized images -> (the pooled/CLS embedding, class logits or None where the model
has no classifier), through the whole forward pass (any intervention included)."""


class _StopForward(Exception):
    """Raised by the hook of the last requested block: later blocks and the head are not run."""


class Backbone(nn.Module):
    """A frozen vision model whose forward returns the requested layers' tokens, (B, T, d) each.

    Subclasses list the hookable modules and their LayerSpecs, turn a module's output into (B, T, d) tokens and
    back (`_tokens`, `_replace`); the hooks, layer resolution, interventions and normalization live here once.
    """

    hub_weights: dict[str, Any] = {}
    """What a tag or "hub" resolved to, set by the family at load time: timm's tag and hub id, open_clip's hub id or
    URL, transformers' revision, or the model folder the weights came from (see `resolved_weights`)."""

    def __init__(self, cfg: BackboneConfig, model: nn.Module, preprocessor: Preprocessor,
                 blocks: Sequence[nn.Module], specs: Sequence[LayerSpec], head: Head | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self._head = head
        self.family, self.arch = cfg.family, cfg.arch
        self.model = model.eval().requires_grad_(False)
        self.preprocessor = preprocessor
        self._blocks = list(blocks)
        self._all_specs = tuple(specs)
        self.n_blocks = len(self._blocks)
        self._specs = tuple(self._resolve(key) for key in cfg.layers)
        for i, spec in enumerate(self._specs):
            if spec in self._specs[:i]:
                raise ConfigError(f"layers {cfg.layers} name layer {spec.name} twice")

    def _resolve(self, key: int | str) -> LayerSpec:
        n = self.n_blocks
        if isinstance(key, int) and -n <= key < n:
            return self._all_specs[key % n]
        for spec in self._all_specs:
            if spec.name == key:
                return spec
        raise ConfigError(f"{self.cfg.model} has no layer {key!r}; use a block index in [-{n}, {n}) "
                          f"or a name: {', '.join(s.name for s in self._all_specs)}")

    def _tokens(self, index: int, output: Tensor) -> Tensor:
        """Block `index`'s output as (B, T, d) tokens in the layer's TokenLayout."""
        raise NotImplementedError

    def _replace(self, index: int, output: Any, tokens: Tensor) -> Any:
        """Block `index`'s output with its layout tokens replaced by `tokens` (B, T, d): the inverse of
        `_tokens`, leaving what the layout drops (registers) as it was."""
        raise NotImplementedError

    def _run(self, x: Tensor) -> None:
        """Run the model on normalized images (B, 3, H, W); the hooks collect the layers."""
        self.model(x)

    def train(self, mode: bool = True) -> Backbone:
        """Stays in eval mode: extraction never trains, and dropout/batch-norm must not change outputs."""
        return super().train(False)

    @property
    def pil_transform(self) -> Callable[[Image.Image], Image.Image]:
        return self.preprocessor.pil_transform

    def spec(self, layer: int | str) -> LayerSpec:
        """Any layer of the model (not only the requested ones), by block index or name."""
        return self._resolve(layer)

    def layer_specs(self) -> tuple[LayerSpec, ...]:
        """The requested layers, in the order of cfg.layers (= the order of forward's dict)."""
        return self._specs

    def metadata(self) -> dict[str, Any]:
        """The store's backbone attrs: enough to reload the same model and preprocessing, what its weights resolved
        to and the library versions that built it (actstore.store's model identity)."""
        path = checkpoint_path(self.cfg.pretrained)
        return {"family": self.family, "name": self.arch, "checkpoint": path or self.cfg.pretrained,
                "init_seed": self.cfg.init_seed, "n_blocks": self.n_blocks,
                "preprocessing": self.preprocessor.describe(), "weights": self.resolved_weights(),
                "versions": library_versions()}

    def resolved_weights(self) -> dict[str, Any]:
        """{} for random weights; {"sha256"} of a checkpoint file (or folder); for a tag or "hub", what it resolved
        to (timm's tag, the hub id and the revision of the cached download)."""
        if self.cfg.pretrained is None:
            return {}
        path = checkpoint_path(self.cfg.pretrained) or self.hub_weights.get("folder")
        if path is not None:
            return {"sha256": file_sha256(path)}
        resolved = {k: v for k, v in self.hub_weights.items() if v}
        if resolved.get("hub_id") and not resolved.get("revision"):
            revision = _cached_revision(resolved["hub_id"])
            if revision:
                resolved["revision"] = revision
        return resolved

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) -> model input on the model's device: /255, then the model's own mean/std."""
        p = next(self.model.parameters())
        x = images.to(p.device, non_blocking=True).float().div_(255)
        mean = torch.tensor(self.preprocessor.mean, device=p.device).view(1, -1, 1, 1)
        std = torch.tensor(self.preprocessor.std, device=p.device).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std).to(p.dtype)

    @torch.no_grad()
    def forward(self, images: Tensor, layers: Sequence[int | str] | None = None) -> dict[str, Tensor]:
        """{layer name: (B, T, d)} for the requested layers (or `layers`, any of the model's), from one forward pass
        with hooks."""
        specs = self._specs if layers is None else tuple(self._resolve(key) for key in layers)
        wanted = {spec.index: spec.name for spec in specs}
        last = max(wanted)
        out: dict[str, Tensor] = {}

        def hook(index: int) -> Callable[..., None]:
            def capture(module: nn.Module, args: Any, output: Tensor) -> None:
                out[wanted[index]] = self._tokens(index, output).contiguous()
                if index == last:
                    raise _StopForward
            return capture

        handles = [self._blocks[i].register_forward_hook(hook(i)) for i in wanted]
        try:
            self._run(self.normalize(images))
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return {spec.name: out[spec.name] for spec in specs}

    @contextmanager
    def intervene(self, layer: int | str, fn: Callable[[Tensor], Tensor]) -> Iterator[LayerSpec]:
        """While open, every forward pass sends `layer`'s tokens (B, T, d), in the layout `forward` returns, through
        `fn` and carries on with what it returns: the hook point extraction reads is the one written here. The hook
        goes before the layer's other hooks, so whatever reads the layer's output sees the change: transformers
        records hidden_states (from which LLaVA takes its image features) by forward hooks on these layers. Two
        interventions nested on one layer run innermost first. An `fn` that returns its argument itself leaves the
        layer's output as it was (the very tensor, so the rest of the forward is bitwise the clean one)."""
        spec = self._resolve(layer)

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            tokens = self._tokens(spec.index, output)
            new = fn(tokens)
            return None if new is tokens else self._replace(spec.index, output, new.to(tokens.dtype))

        handle = self._blocks[spec.index].register_forward_hook(hook, prepend=True)
        try:
            yield spec
        finally:
            handle.remove()

    @torch.no_grad()
    def outputs(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """The model's own final output for uint8 images: (embedding, class logits or None), float32."""
        if self._head is None:
            raise ConfigError(f"{self.cfg.model}: its final output is not available here")
        embedding, logits = self._head(self.normalize(images))
        return embedding.float(), None if logits is None else logits.float()


class ViT(Backbone):
    """Transformers: block outputs are [prefix tokens (CLS, registers), patches] sequences."""

    def __init__(self, cfg: BackboneConfig, model: nn.Module, preprocessor: Preprocessor,
                 blocks: Sequence[nn.Module], *, d: int, grid: Sequence[int], n_prefix: int, has_cls: bool,
                 batch_first: bool = True, head: Head | None = None) -> None:
        tokens = TokenLayout(cls=has_cls, grid=tuple(grid), n_registers_dropped=n_prefix - int(has_cls))
        super().__init__(cfg, model, preprocessor, blocks,
                         [LayerSpec(str(i), d, tokens, i) for i in range(len(blocks))], head)
        self.n_prefix, self.has_cls, self.batch_first = n_prefix, has_cls, batch_first

    @classmethod
    def from_timm(cls, cfg: BackboneConfig, model: nn.Module, vit: nn.Module, preprocessor: Preprocessor,
                  head: Head) -> ViT:
        """`vit` is a timm ViT-style model (itself, or the trunk of an open_clip TimmModel)."""
        if not all(hasattr(vit, a) for a in ("blocks", "num_prefix_tokens", "patch_embed", "embed_dim")):
            raise ConfigError(f"{cfg.model}: only ViT-style timm models (with .blocks and prefix tokens) "
                              f"are supported, not {type(vit).__name__}")
        has_cls = bool(getattr(vit, "has_class_token", getattr(vit, "cls_token", None) is not None))
        return cls(cfg, model, preprocessor, vit.blocks, d=vit.embed_dim, grid=vit.patch_embed.grid_size,
                   n_prefix=vit.num_prefix_tokens, has_cls=has_cls, head=head)

    def _tokens(self, index: int, output: Tensor) -> Tensor:
        x = output if self.batch_first else output.transpose(0, 1)
        if self.n_prefix == int(self.has_cls):
            return x
        patches = x[:, self.n_prefix:]
        return torch.cat([x[:, :1], patches], dim=1) if self.has_cls else patches

    def _replace(self, index: int, output: Tensor, tokens: Tensor) -> Tensor:
        x = output if self.batch_first else output.transpose(0, 1)
        if self.n_prefix != int(self.has_cls):  # put the registers back between CLS and the patches
            cls = int(self.has_cls)
            tokens = torch.cat([tokens[:, :cls], x[:, cls:self.n_prefix], tokens[:, cls:]], dim=1)
        return tokens if self.batch_first else tokens.transpose(0, 1)


class Family:
    """One model library: checks names early, creates the model and its transform.

    The libraries are imported inside the methods: importing them takes seconds, and the CLI should not wait.
    """

    def check(self, arch: str, pretrained: str | None) -> None:
        raise NotImplementedError

    def load(self, cfg: BackboneConfig, path: str | None) -> Backbone:
        raise NotImplementedError
