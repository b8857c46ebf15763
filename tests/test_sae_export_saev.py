"""`actstore export --to saev`: our SAEs written as saev's sae.pt (schema 5), read by saev's current loader the same.

saev's current release is not on the registry (0.1.0 reads only the schema-less header), so the file is checked
against saev's current `nn.load` and `encode` as transcribed in test_sae_imports_saev (src/saev/nn/modeling.py at
OSU-NLP-Group/saev 3d73f1f7): its header's cfg holds only SparseAutoencoderConfig's fields, its state dict is what
SparseAutoencoder(cfg).load_state_dict takes, and saev's encode of raw activations equals our codes of the
normalized ones.
"""

from __future__ import annotations

import io
import json

import pytest
import torch

from actstore.errors import ConfigError
from actstore.loader import Normalization
from actstore.store import ActivationStore
from sae import SAEConfig, SparseAutoencoder, checkpoint
from test_sae_imports_saev import LAYER, saev_encode, tokens

SAEV_CFG_FIELDS = {"d_model", "d_sae", "activation", "reinit_blend", "reinit_enc_dec_tranpose",
                   "remove_parallel_grads", "normalize_w_dec"}
"""saev's SparseAutoencoderConfig (3d73f1f7): the keys its load passes as keyword arguments."""


def our_sae(d: int, kind: str) -> SparseAutoencoder:
    torch.manual_seed(1)
    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=96, kind=kind, k=8,
                                      **({"group_sizes": (32, 64)} if kind == "matryoshka" else {})))
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(96) * 0.3)
        sae.b_dec.copy_(torch.randn(d) * 0.3)
        if sae.cfg.batch_topk:
            sae.batchtopk_threshold.fill_(0.4)
    return sae.eval()


def read_sae_pt(path) -> tuple[dict, dict]:
    line, _, body = path.read_bytes().partition(b"\n")
    return json.loads(line), torch.load(io.BytesIO(body), weights_only=True)


@pytest.mark.parametrize("kind, activation", [("relu", "Relu"), ("topk", "TopK"), ("batchtopk", "BatchTopK"),
                                              ("matryoshka", "BatchTopK")])
def test_saev_export_encodes_as_ours(service_store, tmp_path, kind, activation):
    store = ActivationStore(str(service_store / "store"))
    d = store.layer(LAYER).d
    sae = our_sae(d, kind)
    x = tokens(store, 4).float()
    norm = Normalization(LAYER, "patches", x.mean(0), 0.7)
    checkpoint.save(sae, str(tmp_path / "ours"), norm, extra=checkpoint.origin(store, LAYER))
    from actstore_cli import main

    assert main(["export", "--sae", str(tmp_path / "ours"), "--to", "saev", "--out", str(tmp_path / "saev"), "-q"]) == 0
    header, state = read_sae_pt(tmp_path / "saev" / "sae.pt")
    assert header["schema"] == 5 and set(header["cfg"]) == SAEV_CFG_FIELDS
    assert header["cfg"]["activation"]["cls"] == activation
    assert set(state) == {"W_enc", "W_dec", "b_enc", "b_dec", *(("activation.threshold",) if sae.cfg.batch_topk
                                                                    else ())}
    with torch.no_grad():
        ours = sae.encode((x - norm.mean) * norm.scale)
        ours = ours.to_dense() if hasattr(ours, "to_dense") else ours
        theirs = saev_encode(state, x, activation, 8, subtract_b_dec=False)
        if kind == "topk":  # saev's TopK keeps negative selected values, ours ReLUs them
            theirs = theirs.relu()
        assert (ours - theirs).abs().max() < 1e-4
        back, back_norm = checkpoint.load(str(tmp_path / "saev"))  # and we read our export back
        again = back.encode(x)
        assert back_norm is None and back.cfg.kind == kind
        assert ((again.to_dense() if hasattr(again, "to_dense") else again) - ours).abs().max() < 1e-4
    assert checkpoint.read_extra(str(tmp_path / "saev"))["backbone"] == checkpoint.origin(store, LAYER)["backbone"]


def test_saev_export_refuses_what_saev_cannot_hold_and_others_files(service_store, tmp_path):
    store = ActivationStore(str(service_store / "store"))
    d = store.layer(LAYER).d
    from sae.export import ExportConfig, run_export

    checkpoint.save(our_sae(d, "jumprelu"), str(tmp_path / "jr"))
    with pytest.raises(ConfigError, match="per-latent thresholds"):
        run_export(ExportConfig(sae=str(tmp_path / "jr"), out=str(tmp_path / "x"), to="saev"))
    checkpoint.save(our_sae(d, "relu"), str(tmp_path / "relu"))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "sae.pt").write_bytes(b'{"schema": 5}\n')  # someone's own saev checkpoint: never replaced
    with pytest.raises(ConfigError):
        run_export(ExportConfig(sae=str(tmp_path / "relu"), out=str(theirs), to="saev", overwrite=True))
    assert (theirs / "sae.pt").read_bytes() == b'{"schema": 5}\n'
    run_export(ExportConfig(sae=str(tmp_path / "relu"), out=str(tmp_path / "mine"), to="saev"))
    run_export(ExportConfig(sae=str(tmp_path / "relu"), out=str(tmp_path / "mine"), to="saev", overwrite=True))
    assert read_sae_pt(tmp_path / "mine" / "sae.pt")[0]["exported_by"] == checkpoint.FORMAT
