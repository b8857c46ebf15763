"""saev's sae.pt read as ours: our codes equal saev's encode of the same (normalized) inputs.

The schema-less header (saev <= 0.1, the osunlp hub checkpoints) is written by saev 0.1.0's own `nn.dump` and
compared with its own forward. saev 0.1.0 cannot write the later schemas, so those files are written byte for byte as
saev's current `nn.load` reads them (src/saev/nn/modeling.py at OSU-NLP-Group/saev 3d73f1f7: a JSON header line,
then `torch.save` of the state dict) and compared with `saev_encode`, a plain torch copy of that file's `encode` and
activations (schema 1 with the encode that wrote it, which subtracted b_dec: modeling.py at 79cda4e).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

from actstore.errors import ConfigError
from actstore.store import ActivationStore
from sae import checkpoint

LAYER = "10"
D_SAE = 96


def tokens(store: ActivationStore, n: int | None = None) -> torch.Tensor:
    return store.read(LAYER, 0, n)[:, 1:].reshape(-1, store.layer(LAYER).d).double()


def dense(acts) -> torch.Tensor:
    return acts.to_dense() if hasattr(acts, "to_dense") else acts


def write_sae_pt(path: Path, header: dict, state: dict) -> None:
    """sae.pt as saev's nn.dump writes it: the header's JSON line, then torch.save of the state dict."""
    body = io.BytesIO()
    torch.save(state, body)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(json.dumps(header).encode() + b"\n" + body.getvalue())


def random_state(d: int, seed: int, threshold: float | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {"W_dec": torch.randn(D_SAE, d, generator=g) / math.sqrt(d), "b_dec": torch.randn(d, generator=g) * 0.3,
             "W_enc": torch.randn(d, D_SAE, generator=g) / math.sqrt(d), "b_enc": torch.randn(D_SAE, generator=g) * 0.3}
    if threshold is not None:
        state["activation.threshold"] = torch.tensor(threshold)
    return state


def saev_encode(state: dict[str, torch.Tensor], x: torch.Tensor, activation: str, top_k: int, subtract_b_dec: bool
                ) -> torch.Tensor:
    """saev's SparseAutoencoder.encode and its activations in eval mode (Relu, TopK, BatchTopK), float32."""
    h = (x - state["b_dec"] if subtract_b_dec else x) @ state["W_enc"] + state["b_enc"]
    if activation == "Relu":
        return torch.nn.functional.relu(h)
    if activation == "TopK":
        _, idxs = torch.topk(h, min(top_k, h.shape[1]), dim=-1, sorted=False)
        return torch.zeros_like(h).scatter(-1, idxs, 1.0) * h
    threshold = state["activation.threshold"]
    return torch.where(h > (threshold if threshold > 0 else 0), h, torch.zeros_like(h))


def payload(activation: str, top_k: int) -> dict:
    """saev's _serialize_dataclass of an activation config, as schema 5 writes it."""
    params = {"key": {"Relu": "relu", "TopK": "top-k", "BatchTopK": "batch-top-k"}.get(activation, "other")}
    if activation != "Relu":
        params["top_k"] = top_k
    return {"cls": activation, "params": params}


def header(schema: int, activation: str, d: int, top_k: int = 8, form: str = "payload") -> dict:
    if form == "cls":  # schema 1 as first written: the activation's class is the header's cls
        return {"schema": 1, "cls": activation, "cfg": {"d_vit": d, "exp_factor": D_SAE // d, "top_k": top_k},
                "commit": "unknown", "lib": "0.1.0"}
    return {"schema": schema, "commit": "unknown", "lib": "1.0.0",
            "cfg": {"d_model": d, "d_sae": D_SAE, "activation": payload(activation, top_k), "reinit_blend": 0.8,
                    "reinit_enc_dec_tranpose": True, "remove_parallel_grads": True, "normalize_w_dec": True}}


def test_saev_010_checkpoint_codes_equal_saev_own_encode(service_store, tmp_path):
    import saev.config
    import saev.nn

    store = ActivationStore(str(service_store / "store"))
    d = store.layer(LAYER).d
    torch.manual_seed(0)
    peer = saev.nn.SparseAutoencoder(saev.config.SparseAutoencoder(d_vit=d, exp_factor=2))
    with torch.no_grad():
        peer.b_dec.copy_(torch.randn(d) * 0.3)
        peer.b_enc.copy_(torch.randn(2 * d) * 0.3)
    saev.nn.dump(str(tmp_path / "run" / "sae.pt"), peer)
    with pytest.raises(ConfigError, match="pass --layer"):  # sae.pt names no layer
        checkpoint.load_on_store(str(tmp_path / "run"), store)
    sae, norm, spec = checkpoint.load_on_store(str(tmp_path / "run" / "sae.pt"), store, layer=LAYER)
    assert spec.name == LAYER and checkpoint.read_extra(f"saev:{tmp_path / 'run'}")["imported"]["schema"] is None
    # saev 0.1.0's DataLoad transform: (x - mean) / (E||x - mean|| / sqrt(d)), here over all of the store's patches
    x_all = tokens(store)
    mean = x_all.mean(0)
    scalar = (x_all - mean).norm(dim=1).mean() / math.sqrt(d)
    x = x_all[:400]
    expected_in = ((x - mean) / scalar).float()
    assert (norm.apply(x.float()) - expected_in).abs().max().item() < 1e-4
    with torch.no_grad():
        expected = peer(expected_in)[1]
        ours = dense(sae.encode(expected_in))
    assert ((ours > 0) == (expected > 0)).float().mean() > 0.999
    difference = (ours - expected).abs().max().item()
    assert difference < 1e-4 * max(1.0, expected.abs().max().item()), difference
    print(f"saev 0.1.0 relu: max |ours - saev| = {difference:.2e}")


@pytest.mark.parametrize("schema, activation, form, threshold", [
    (1, "Relu", "cls", None),
    (1, "TopK", "cls", None),
    (1, "Relu", "payload", None),
    (2, "TopK", "payload", None),
    (3, "Relu", "payload", None),
    (4, "BatchTopK", "payload", 0.4),
    (5, "BatchTopK", "payload", 0.4),
    (5, "BatchTopK", "payload", -0.2),
    (5, "TopK", "payload", None),
    (5, "Relu", "payload", None),
])
def test_saev_schemas_codes_equal_saev_encode(service_store, tmp_path, schema, activation, form, threshold):
    store = ActivationStore(str(service_store / "store"))
    d = store.layer(LAYER).d
    state = random_state(d, seed=schema, threshold=threshold)
    write_sae_pt(tmp_path / "sae.pt", header(schema, activation, d, form=form), state)
    x_all = tokens(store)
    x = ((x_all[:400] - x_all.mean(0)) / (x_all - x_all.mean(0)).norm(dim=1).mean() * math.sqrt(d)).float()
    expected = saev_encode(state, x, activation, 8, subtract_b_dec=schema == 1)
    if activation == "TopK":  # saev keeps negative selected values; every token here has k positive ones
        assert (expected >= 0).all()
    sae, norm = checkpoint.load(f"saev:{tmp_path / 'sae.pt'}")
    found, _ = checkpoint.load(str(tmp_path))  # found from the folder's sae.pt
    with torch.no_grad():
        ours = dense(sae.encode(x))
        assert torch.equal(ours, dense(found.encode(x)))
    assert norm is None
    assert ((ours > 0) == (expected > 0)).float().mean() > 0.999
    difference = (ours - expected).abs().max().item()
    assert difference < 1e-4 * max(1.0, expected.abs().max().item()), difference
    print(f"saev schema {schema} {activation} ({form}, threshold {threshold}): max |ours - saev| = {difference:.2e}")
    _, store_norm, _ = checkpoint.load_on_store(str(tmp_path), store, layer=LAYER)
    assert (store_norm is None) == (schema != 1)  # schema >= 2: saev trains on raw activations


class NotWeights:
    """Any class: a pickle of it is not plain weights."""


@pytest.mark.parametrize("change, message", [
    ({"schema": 6}, "saev header schema 6"),
    ({"activation": "JumpRelu"}, "a saev 'JumpRelu' activation"),
    ({"activation": "BatchTopK"}, "without its inference threshold"),
    ({"state": {"extra": NotWeights()}}, "not plain weights, refused"),
])
def test_what_we_cannot_read_is_refused(tmp_path, change, message):
    d = 16
    h = header(change.get("schema", 3), change.get("activation", "Relu"), d)
    state = {**random_state(d, seed=0), **change.get("state", {})}
    write_sae_pt(tmp_path / "sae.pt", h, state)
    with pytest.raises(ConfigError, match=message) as e:
        checkpoint.load(f"saev:{tmp_path}")
    assert "\n" not in str(e.value)
