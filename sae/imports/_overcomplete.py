"""overcomplete (github.com/KempnerInstitute/overcomplete): an SAE module pickled whole, `torch.save(sae)`, the way
overcomplete's own tests save and reload its SAEs (tests/sae/test_save_and_load.py; its README and docs name no
other way). A state dict would not do: the class, `top_k` and BatchTopK's `running_threshold` are plain attributes,
not in it. `--sae overcomplete:PATH` names the file (any name); it is found when its pickle names overcomplete.

Read without running any code of the peer's (nor needing it installed): torch.load(weights_only=True) with each
`overcomplete.*` and `torch.nn.modules.*` global the pickle names (torch.serialization.get_unsafe_globals_in_checkpoint)
allowlisted as an inert stand-in of ours (`_Pickled`), which only records the attributes pickled for it. A pickle
naming any other global is refused in one line and never unpickled; torch's weights_only unpickler stays the
second wall. (Allowlisting the peer's real classes would run their construction and need the package, which does not
import with matplotlib >= 3.9.) torch's allowlist is process-wide while we load: another thread's torch.load then
would meet the same inert stand-ins, nothing more.

overcomplete 0.3.0 (overcomplete/sae/*.py, KempnerInstitute/overcomplete a1781af) encodes with its encoder

    "linear" (MLPEncoder, nb_blocks=0, norm_layer=Identity, ReLU):  pre = x @ W.T + b,  codes = relu(pre)
    TieableEncoder (`sae.tied()` / `untied()`):  pre = x @ W.T (+ bias), W its own weight or the dictionary D

and decodes x_hat = codes @ D, D (nb_concepts, d) without a bias: the dictionary the module decodes with, i.e. the
`_fused_dictionary` of a DictionaryLayer saved in eval mode, else normalization(_weights) * exp(multiplier) as its
get_dictionary computes it (normalizations l2, max_l2, l1, max_l1, identity; the peer's `.eval()` after a reload
normalizes the saved dictionary once more, twice for a tied encoder: a last-bit difference). Ours: W_enc = W,
b_enc = b (or 0), W_dec = D, b_dec = 0: nothing to fold. Kinds, at inference (the peer's eval mode):

- SAE -> relu: relu(pre).
- TopKSAE -> topk, k = top_k: the k largest of relu(pre), ours the ReLU'd k largest of pre: the same codes.
- BatchTopKSAE -> batchtopk: relu(pre) where relu(pre) >= running_threshold (batchtopk_sae.py `encode`); ours keeps
  pre > t, so t is the float32 number just below running_threshold (clamped at 0, where both are relu(pre)). Our k
  is top_k (over the peer's whole batch) clamped to d_sae: unused at inference.
- JumpSAE -> jumprelu: relu(pre) zeroed where < exp(thresholds) (jump_sae.py `JumpReLU.forward`); our threshold is
  the float32 number just below exp(thresholds) (torch's float32 exp on the CPU; a GPU's may differ in the last bit).

Refused in one line: MpSAE, OMPSAE (pursuits), QSAE (quantized codes), RATopKSAE and RAJumpSAE (archetypal
dictionaries) or any other class; MLP (hidden blocks, LayerNorm/BatchNorm, another output activation), attention,
ResNet and identity encoders; a BatchTopKSAE without a running threshold (never trained: its encode couples the
tokens of a batch); weights not float32; a pickled object that is not an SAE module, or not laid out as 0.3.0
pickles one; any other global.

Input normalization: none recorded, none applied: train_sae (sae/train.py) trains on the batches the user's
DataLoader yields (JumpSAE's docstring advises standardizing them; the file cannot tell). The pickle names no model
or layer: the origin is only "names", so --layer is required.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, Callable

import fsspec
import torch

from actstore.errors import ConfigError, CorruptDataError
from actstore.loader import Normalization
from sae.config import SAEConfig
from sae.model import SparseAutoencoder

_PREFIXES = ("overcomplete.", "torch.nn.modules.")
"""The globals read as inert stand-ins; a pickle naming any other (beyond torch's weights_only defaults) is refused."""
_SAE = "overcomplete.sae."
_KINDS = {f"{_SAE}base.SAE": "relu", f"{_SAE}topk_sae.TopKSAE": "topk",
          f"{_SAE}batchtopk_sae.BatchTopKSAE": "batchtopk", f"{_SAE}jump_sae.JumpSAE": "jumprelu"}
_REFUSED = {f"{_SAE}mp_sae.MpSAE": "encodes by matching pursuit", f"{_SAE}omp_sae.OMPSAE": "encodes by orthogonal "
            "matching pursuit", f"{_SAE}qsae.QSAE": "quantizes its codes", f"{_SAE}rasae.RATopKSAE": "has an "
            "archetypal dictionary", f"{_SAE}rasae.RAJumpSAE": "has an archetypal dictionary"}
_MLP, _TIEABLE, _DICTIONARY = (f"{_SAE}modules.MLPEncoder", f"{_SAE}modules.TieableEncoder",
                               f"{_SAE}dictionary.DictionaryLayer")
_LINEAR, _IDENTITY, _RELU = ("torch.nn.modules.linear.Linear", "torch.nn.modules.linear.Identity",
                             "torch.nn.modules.activation.ReLU")
_NORMALIZATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {  # overcomplete/sae/dictionary.py, verbatim
    f"{_SAE}dictionary.normalize_l2": lambda x: x / (torch.norm(x, p=2, dim=1, keepdim=True) + 1e-8),
    f"{_SAE}dictionary.normalize_max_l2":
        lambda x: x / torch.amax(torch.norm(x, p=2, dim=1, keepdim=True), dim=0, keepdim=True),
    f"{_SAE}dictionary.normalize_l1": lambda x: x / (torch.norm(x, p=1, dim=1, keepdim=True) + 1e-8),
    f"{_SAE}dictionary.normalize_max_l1":
        lambda x: x / torch.amax(torch.norm(x, p=1, dim=1, keepdim=True), dim=0, keepdim=True),
    f"{_SAE}dictionary.normalize_identity": lambda x: x,
}


class _Pickled:
    """Inert stand-in for a class or function the pickle names (`path`): records what the pickle gives it."""

    path = ""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}


def detect(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    """A torch.save file whose pickle names an overcomplete class (read from its data.pkl alone)."""
    if not fs.isfile(root):
        return False
    try:
        return any(name.startswith(_SAE) for name in config(fs, root, root)["globals"])
    except (ConfigError, CorruptDataError):
        return False


def config(fs: fsspec.AbstractFileSystem, root: str, url: str) -> dict[str, Any]:
    """The globals the pickle names (beyond torch's defaults) and the SAE class among them: data.pkl alone."""
    with fs.open(root, "rb") as f:
        names = _globals(f, url)
    classes = [name for name in names if name in _KINDS or name in _REFUSED]
    return {"globals": names, "class": classes[0] if len(classes) == 1 else None}


def extra(cfg: dict[str, Any]) -> dict[str, Any]:
    """No layer, no model: the pickle records neither."""
    settings = {key: cfg[key] for key in ("top_k",) if cfg.get(key) is not None}
    return {"names": "an overcomplete SAE (its pickle names no model or layer)",
            "imported": {"format": "overcomplete", "version": None, "class": (cfg["class"] or "?").rsplit(".", 1)[-1],
                         "activation": _KINDS.get(cfg["class"]), **settings}}


def read(fs: fsspec.AbstractFileSystem, root: str, url: str, device: torch.device | str | None
         ) -> tuple[SparseAutoencoder, Normalization | None, dict[str, Any]]:
    data = fs.cat_file(root)
    names = _globals(io.BytesIO(data), url)
    other = sorted(name for name in names if not name.startswith(_PREFIXES))
    if other:
        raise ConfigError(f"{url}: pickles {', '.join(other)}: neither plain weights nor an overcomplete SAE; "
                          "refused, not unpickled")
    stand_ins = [(type(name, (_Pickled,), {"path": name}), name) for name in names]
    try:
        with torch.serialization.safe_globals(stand_ins):
            sae = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{url}: not plain weights nor an overcomplete SAE, refused (torch.load weights_only: "
                          f"{str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CorruptDataError(f"{url}: not a torch.save file ({e})", key=root) from None
    try:
        return _build(sae, url, device), None, extra({"class": _path(sae), "top_k": sae.state.get("top_k")})
    except (KeyError, AttributeError, TypeError) as e:  # stand-ins without the attributes overcomplete 0.3.0 pickles
        raise ConfigError(f"{url}: not an overcomplete SAE module as 0.3.0 pickles it ({type(e).__name__}: {e})"
                          ) from None


def _build(sae: Any, url: str, device: torch.device | str | None) -> SparseAutoencoder:
    """Our SAE from the stand-in of a pickled overcomplete SAE (module docstring)."""
    path = _path(sae)
    if path not in _KINDS:
        what = f"an overcomplete {_name(sae)}, which {_REFUSED[path]}" if path in _REFUSED else f"a {_name(sae)}"
        raise ConfigError(f"{url}: {what}; we read overcomplete's {', '.join(map(_name, _KINDS))} with a linear "
                          "encoder")
    kind, state = _KINDS[path], sae.state
    W, b = _encoder(state["_modules"]["encoder"], url)
    D = _dictionary(state["_modules"]["dictionary"], url)
    d_sae, d_in = D.shape
    if W.shape != D.shape or (b is not None and b.shape != (d_sae,)):
        raise ConfigError(f"{url}: encoder {tuple(W.shape)} and dictionary {tuple(D.shape)} do not match")
    top_k = state.get("top_k")
    settings: dict[str, Any] = {"k": min(int(top_k), d_sae) if kind == "batchtopk" else int(top_k)} if top_k else {}
    ours = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, kind=kind, **settings), device=device)
    with torch.no_grad():
        for key, value in (("W_enc", W), ("b_enc", torch.zeros(d_sae) if b is None else b), ("W_dec", D),
                           ("b_dec", torch.zeros(d_in))):
            getattr(ours, key).copy_(value)
        if kind == "batchtopk":
            threshold = state.get("running_threshold")
            if threshold is None:
                raise ConfigError(f"{url}: an overcomplete BatchTopKSAE without a running threshold (never trained): "
                                  "its encode couples the tokens of a batch, which no kind of ours does")
            ours.batchtopk_threshold.fill_(float(_below(_float32(threshold, url)).clamp_min(0)))
        if kind == "jumprelu":
            ours.threshold.copy_(_below(torch.exp(_float32(state["_parameters"]["thresholds"], url))))
    return ours.eval()


def _globals(f: Any, url: str) -> list[str]:
    """The globals a torch.save file's pickle names beyond torch's weights_only defaults, read statically."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(f))
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{url}: a pickle this reader does not read ({e}), refused") from None
    except (RuntimeError, ValueError, EOFError) as e:
        raise CorruptDataError(f"{url}: not a torch.save file ({e})", key=url) from None


def _path(obj: Any) -> str | None:
    """The global a stand-in (instance or class) stands for; None for anything else."""
    return obj.path if isinstance(obj, _Pickled) or (isinstance(obj, type) and issubclass(obj, _Pickled)) else None


def _name(obj: Any) -> str:
    """A short name for messages: the class a stand-in stands for, or the object's type; a global's last part."""
    path = obj if isinstance(obj, str) else _path(obj) or type(obj).__name__
    return path.rsplit(".", 1)[-1]


def _float32(tensor: Any, url: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float32:
        found = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ConfigError(f"{url}: overcomplete weights in {found}; we read float32 SAEs exactly")
    return tensor.detach()


def _below(t: torch.Tensor) -> torch.Tensor:
    """The float32 numbers just below t: our `pre > that` is the peer's `pre >= t`."""
    return torch.nextafter(t, torch.full_like(t, -torch.inf))


def _encoder(encoder: Any, url: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W (nb_concepts, d), bias or None) of a linear encoder; any other refused."""
    path, state = _path(encoder), getattr(encoder, "state", {})
    if path == _TIEABLE:
        tied = state["_modules"].get("tied_to")
        W = _dictionary(tied, url) if tied is not None else _float32(state["_parameters"]["weight"], url)
        bias = state["_parameters"].get("bias")
        return W, None if bias is None else _float32(bias, url)
    if path == _MLP:
        modules = state["_modules"]
        final = modules["final_block"].state["_modules"]
        blocks, layers = len(modules["mlp_blocks"].state["_modules"]), [_path(layer) for layer in final.values()]
        if not blocks and layers == [_LINEAR, _IDENTITY] and _path(modules["final_activation"]) == _RELU:
            linear = final["0"].state["_parameters"]
            return _float32(linear["weight"], url), _float32(linear["bias"], url)
        raise ConfigError(f"{url}: an overcomplete MLPEncoder other than its 'linear' one ({blocks} hidden blocks, "
                          f"{' then '.join(map(_name, layers))}, {_name(modules['final_activation'])} output): no "
                          "kind of ours encodes so")
    raise ConfigError(f"{url}: an overcomplete SAE with encoder {_name(encoder)}; we read its linear encoders (the "
                      "'linear' MLPEncoder, TieableEncoder)")


def _dictionary(layer: Any, url: str) -> torch.Tensor:
    """D (nb_concepts, d) as the DictionaryLayer decodes with it (module docstring)."""
    if _path(layer) != _DICTIONARY:
        raise ConfigError(f"{url}: an overcomplete dictionary {_name(layer)}; we read DictionaryLayer")
    state = layer.state
    if not state["training"] and state.get("_fused_dictionary") is not None:
        return _float32(state["_fused_dictionary"], url)
    normalize = _NORMALIZATIONS.get(_path(state["normalization"]) or "")
    if normalize is None:
        raise ConfigError(f"{url}: an overcomplete dictionary normalization {_name(state['normalization'])}; we "
                          f"read {', '.join(name.split('normalize_')[-1] for name in _NORMALIZATIONS)}")
    multiplier = state["_parameters"].get("multiplier", state["_buffers"].get("multiplier"))
    with torch.no_grad():
        return normalize(_float32(state["_parameters"]["_weights"], url)) * torch.exp(_float32(multiplier, url))
