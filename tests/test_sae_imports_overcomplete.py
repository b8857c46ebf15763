"""overcomplete SAEs read as ours: built and run by overcomplete 0.3.0's own classes, saved as its own tests save them
(torch.save of the whole module); our codes equal the peer's own encode of the same inputs, float32.

The pickles are read without running any of the peer's code: what is not an overcomplete SAE of plain weights is
refused, and a pickled object whose unpickling would write a file is proven not to have run.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch

from actstore.errors import ActstoreError, ConfigError
from actstore.store import ActivationStore
from sae import checkpoint

LAYER = "10"
D_SAE = 96


def oc():
    """overcomplete.sae, importable: overcomplete 0.3.0's visualization module calls matplotlib.cm.get_cmap when
    imported, which matplotlib 3.9 removed; this gives it back (a compat shim for the third-party import, the peer's
    own code then runs unchanged)."""
    import matplotlib
    import matplotlib.cm

    if not hasattr(matplotlib.cm, "get_cmap"):
        matplotlib.cm.get_cmap = matplotlib.colormaps.get_cmap
    import overcomplete.sae

    return overcomplete.sae


def tokens(store: ActivationStore, n: int = 4) -> torch.Tensor:
    return store.read(LAYER, 0, n)[:, 1:].reshape(-1, store.layer(LAYER).d).float()


def dense(acts) -> torch.Tensor:
    return acts.to_dense() if hasattr(acts, "to_dense") else acts


def exp_exactly(value: torch.Tensor) -> torch.Tensor | None:
    """A float32 t with torch.exp(t) == value exactly (a JumpSAE threshold on a pre-activation), None if none near."""
    t = torch.log(value)
    for _ in range(8):
        e = torch.exp(t)
        if e == value:
            return t
        t = torch.nextafter(t, torch.tensor(-math.inf if e > value else math.inf))
    return None


def peer_sae(name: str, d: int, x: torch.Tensor):
    """An overcomplete SAE of each case, trained-looking: its own forward in training mode on x (the dictionary
    normalized, BatchTopK's running threshold set), thresholds where some latents fire, then eval mode; for the
    batchtopk and jumprelu cases a latent's threshold equals one of token 0's pre-activations exactly (the peer
    keeps it: >=)."""
    sae = oc()
    torch.manual_seed(0)
    if name == "relu":
        peer = sae.SAE(d, D_SAE)
    elif name in ("topk", "topk-tied"):
        peer = sae.TopKSAE(d, D_SAE, top_k=8)
        if name == "topk-tied":
            peer.tied()
    elif name == "relu-untied-max_l1-saved-training":
        peer = sae.SAE(d, D_SAE, dictionary_params={"normalization": "max_l1", "use_multiplier": True})
        peer.tied().untied(bias=True)
        with torch.no_grad():
            peer.encoder.bias.copy_(torch.randn(D_SAE) * 0.3)
            peer.dictionary.multiplier.fill_(0.3)
    elif name == "batchtopk":
        peer = sae.BatchTopKSAE(d, D_SAE, top_k=8 * x.shape[0])
    else:
        peer = sae.JumpSAE(d, D_SAE)
    peer.train()
    with torch.no_grad():
        peer(x)
        pre = peer.encode(x)[0]
        if name == "batchtopk":
            peer.running_threshold = pre[0][pre[0] > 0].median()  # a pre-activation of token 0, exactly
        if name == "jumprelu":
            peer.thresholds.copy_(torch.log(pre.relu().quantile(0.8, dim=0).clamp_min(1e-3)))
            exact = next((j, t) for j in range(D_SAE) if pre[0, j] > 0
                         for t in [exp_exactly(pre[0, j])] if t is not None)
            peer.thresholds[exact[0]] = exact[1]
    return peer.eval()


CASES = ["relu", "topk", "topk-tied", "relu-untied-max_l1-saved-training", "batchtopk", "jumprelu"]
KINDS = {"relu": "relu", "topk": "topk", "topk-tied": "topk", "relu-untied-max_l1-saved-training": "relu",
         "batchtopk": "batchtopk", "jumprelu": "jumprelu"}


@pytest.mark.parametrize("case", CASES)
def test_overcomplete_codes_equal_overcomplete_encode(service_store, tmp_path, case):
    store = ActivationStore(str(service_store / "store"))
    x = tokens(store)
    peer = peer_sae(case, store.layer(LAYER).d, x)
    if case.endswith("saved-training"):  # its dictionary is not fused: we normalize it as the peer does in training
        peer.train()
    path = tmp_path / "sae.pth"
    torch.save(peer, path)  # as overcomplete's tests/sae/test_save_and_load.py saves its SAEs
    with torch.no_grad():
        expected = peer.encode(x)[1]
        peer_decoded = peer.decode(expected)
        found = checkpoint.load(str(path))[0]  # found from its pickle
        named = checkpoint.load(f"overcomplete:{path}")[0]
        ours = dense(found.encode(x))
        decoded = found.decode(found.encode(x))
        assert torch.equal(ours, dense(named.encode(x)))
    assert found.cfg.kind == KINDS[case] and found.cfg.d_sae == D_SAE and not found.training
    if case.startswith("topk"):
        assert found.cfg.k == 8
    assert torch.equal(ours > 0, expected > 0), "the same latents fire"
    if case in ("batchtopk", "jumprelu"):  # a pre-activation exactly at its threshold fires in both
        at = peer.running_threshold if case == "batchtopk" else torch.exp(peer.thresholds)
        exact = (peer.encode(x)[0][0] == at) & (expected[0] > 0)
        assert exact.any() and (ours[0][exact] > 0).all()
    difference = (ours - expected).abs().max().item()
    assert difference <= 1e-5 * max(1.0, expected.abs().max().item()), difference
    rec = (decoded - peer_decoded).abs().max().item()
    assert rec <= 1e-4 * max(1.0, peer_decoded.abs().max().item()), rec
    print(f"overcomplete {case}: max |ours - overcomplete| codes {difference:.2e}, reconstructions {rec:.2e}, "
          f"{int((expected > 0).sum())} active")


def test_the_origin_is_names_only_and_needs_layer(service_store, tmp_path):
    store = ActivationStore(str(service_store / "store"))
    x = tokens(store, 2)
    torch.save(peer_sae("topk", store.layer(LAYER).d, x), tmp_path / "sae.pt")
    extra = checkpoint.read_extra(str(tmp_path / "sae.pt"))
    assert "layer" not in extra and "overcomplete" in extra["names"]
    assert extra["imported"]["format"] == "overcomplete" and extra["imported"]["class"] == "TopKSAE"
    with pytest.raises(ConfigError, match="does not say which layer it was trained on; pass"):
        checkpoint.load_on_store(str(tmp_path / "sae.pt"), store)
    sae, norm, spec = checkpoint.load_on_store(str(tmp_path / "sae.pt"), store, layer=LAYER)
    assert spec.name == LAYER and norm is None and sae.cfg.kind == "topk"


def refused_cases():
    """(name, build the object to torch.save, the refusal's words)."""
    sae = oc()
    return {
        "mp": (lambda: sae.MpSAE(16, 32, k=2), "an overcomplete MpSAE, which encodes by matching pursuit"),
        "qsae": (lambda: sae.QSAE(16, 32), "QSAE, which quantizes its codes"),
        "archetypal": (lambda: sae.RATopKSAE(16, 32, points=torch.randn(64, 16), top_k=4),
                       "RATopKSAE, which has an archetypal dictionary"),
        "mlp": (lambda: sae.TopKSAE(16, 32, top_k=4, encoder_module="mlp_ln_1"),
                "MLPEncoder other than its 'linear' one \\(0 hidden blocks, Linear then LayerNorm"),
        "attention": (lambda: sae.SAE((4, 16), 32, encoder_module="attention_1b"), "with encoder AttentionEncoder"),
        "untrained batchtopk": (lambda: sae.BatchTopKSAE(16, 32, top_k=4), "without a running threshold"),
        "float64": (lambda: sae.SAE(16, 32).double(), "weights in torch.float64"),
        "a dict": (lambda: {"sae": sae.SAE(16, 32)}, "a dict; we read overcomplete's SAE, TopKSAE"),
    }


@pytest.mark.parametrize("case", ["mp", "qsae", "archetypal", "mlp", "attention", "untrained batchtopk", "float64",
                                  "a dict"])
def test_what_we_cannot_represent_is_refused(tmp_path, case):
    build, message = refused_cases()[case]
    torch.save(build(), tmp_path / "sae.pt")
    with pytest.raises(ConfigError, match=message) as e:
        checkpoint.load(str(tmp_path / "sae.pt"))
    assert "\n" not in str(e.value)


class WritesAFile:
    """Unpickling this runs exec, which writes `marker`: what a reader must never do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_a_pickle_that_is_not_plain_weights_is_refused_unexecuted(tmp_path):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(WritesAFile(proof)))  # the trap works: plain unpickling writes its file
    assert proof.exists()
    marker = tmp_path / "ran"
    torch.save(WritesAFile(marker), tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="no overcomplete SAE there"):
        checkpoint.load(f"overcomplete:{tmp_path / 'evil.pt'}")
    with pytest.raises((ActstoreError, OSError)):  # no reader claims it, nor is it ours
        checkpoint.load(str(tmp_path / "evil.pt"))
    peer = oc().TopKSAE(16, 32, top_k=4)
    peer.note = WritesAFile(marker)  # an overcomplete SAE carrying it: found, refused unpickled
    torch.save(peer, tmp_path / "sae.pt")
    with pytest.raises(ConfigError, match="pickles builtins.exec: neither plain weights") as e:
        checkpoint.load(str(tmp_path / "sae.pt"))
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_a_state_dict_is_not_read(tmp_path):
    """A state dict records neither the class nor top_k nor BatchTopK's threshold: not claimed, refused when named."""
    torch.save(oc().TopKSAE(16, 32, top_k=4).state_dict(), tmp_path / "sae.pt")
    with pytest.raises(ConfigError, match="no overcomplete SAE there"):
        checkpoint.load(f"overcomplete:{tmp_path / 'sae.pt'}")


def test_our_checkpoints_are_not_claimed(tmp_path):
    from sae import SAEConfig, SparseAutoencoder

    ours = SparseAutoencoder(SAEConfig(d_in=16, d_sae=32, kind="relu"))
    checkpoint.save(ours, str(tmp_path / "ours"))
    assert checkpoint.load(str(tmp_path / "ours"))[0].cfg == ours.cfg
    with pytest.raises(ConfigError, match="no overcomplete SAE there"):
        checkpoint.load(f"overcomplete:{tmp_path / 'ours'}")
