"""SAE models, metrics and checkpoints: each against an independent computation (numpy where it matters)."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
import torch

from actstore.config import load_config
from actstore.errors import ConfigError, StoreFormatError, StoreNotFoundError
from actstore.loader import Normalization
from sae import (KINDS, SAEConfig, SparseActs, SparseAutoencoder, export_saelens,
                 geometric_median, load, read_extra, save)
from sae import metrics
from sae.acts import csr_offsets
from sae.config import default_group_sizes

D_IN, D_SAE, K = 24, 96, 4


def make(kind: str, **kw) -> SparseAutoencoder:
    return SparseAutoencoder(SAEConfig(d_in=D_IN, kind=kind, d_sae=D_SAE, k=K, **kw))


def data(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) + 0.5


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


# config ---------------------------------------------------------------------------------------

def test_config_resolves_d_sae_and_validates(tmp_path):
    assert SAEConfig(d_in=768).d_sae == 768 * 16
    assert SAEConfig(d_in=768, expansion=8).d_sae == 6144
    cfg = SAEConfig(d_in=768, d_sae=1000)
    assert cfg.expansion == 1000 / 768 and SAEConfig(**{**cfg.__dict__}) == cfg  # cfg.json round trip
    for bad in ({"kind": "gated"}, {"d_sae": 64, "expansion": 4}, {"k": 0}, {"k": 100_000}, {"l1_coeff": -1},
                {"jumprelu_bandwidth": 0}, {"dtype": "float16"}, {"d_in": 0}, {"batchtopk_threshold_lr": 2}):
        with pytest.raises(ConfigError):
            SAEConfig(**{"d_in": 768, **bad})
    toml = tmp_path / "sae.toml"
    toml.write_text('d_in = 32\nkind = "jumprelu"\nexpansion = 4\n')
    expected = SAEConfig(d_in=32, kind="jumprelu", d_sae=128, l0_coeff=0.5)
    assert load_config(SAEConfig, toml, {"l0_coeff": 0.5}) == expected


def test_matryoshka_config_groups_default_and_validate(tmp_path):
    cfg = SAEConfig(d_in=8, kind="matryoshka", d_sae=32, group_sizes=[4, 4, 8, 16])  # lists come from JSON / TOML
    assert cfg.group_sizes == (4, 4, 8, 16) and cfg.prefix_ends == (4, 8, 16, 32) and cfg.sparse
    assert SAEConfig(**json.loads(json.dumps(cfg.__dict__))) == cfg  # cfg.json round trip
    assert SAEConfig(d_in=64, kind="matryoshka", expansion=16).group_sizes == (64, 64, 128, 256, 512)
    for d_sae in (1, 2, 3, 17, 96, 1000):
        sizes = default_group_sizes(d_sae)
        assert sum(sizes) == d_sae and min(sizes) >= 1
        assert SAEConfig(d_in=4, kind="matryoshka", d_sae=d_sae, k=1).group_sizes == sizes
    assert SAEConfig(d_in=4, kind="topk").group_sizes is None and SAEConfig(d_in=4, kind="topk").prefix_ends == ()
    for bad in ({"group_sizes": (4, 4, 8)}, {"group_sizes": (4, 4, 8, 17)}, {"group_sizes": (0, 8, 8, 16)},
                {"group_sizes": (-4, 12, 8, 16)}, {"group_sizes": (4.0, 4, 8, 16)}, {"group_sizes": ()},
                {"group_sizes": 32}, {"k": 0}, {"k": 33}, {"kind": "topk", "group_sizes": (16, 16)},
                {"kind": "batchtopk", "group_sizes": (32,)}):
        with pytest.raises(ConfigError, match="group_sizes|k must"):
            SAEConfig(**{"d_in": 8, "kind": "matryoshka", "d_sae": 32, **bad})
    toml = tmp_path / "sae.toml"
    toml.write_text('d_in = 8\nkind = "matryoshka"\nd_sae = 32\ngroup_sizes = [16, 16]\n')
    assert load_config(SAEConfig, toml).group_sizes == (16, 16)


# models ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_forward_backward_every_kind(kind):
    sae = make(kind)
    x = data()
    out = sae(x)
    assert out.x_hat.shape == x.shape and torch.isfinite(out.loss)
    expected = {"relu": {"mse", "l1"}, "jumprelu": {"mse", "l0"}, "matryoshka": {"mse", "matryoshka"}}
    assert set(out.losses) == expected.get(kind, {"mse"})
    assert isinstance(out.acts, SparseActs) == (kind in ("topk", "batchtopk", "matryoshka"))
    torch.testing.assert_close(out.losses["mse"], (x - out.x_hat).square().sum(1).mean())
    out.loss.backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    torch.testing.assert_close(sae.decode(sae.encode(x)), out.x_hat)


def test_init_ties_encoder_to_decoder_with_unit_rows():
    sae = make("relu")
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    assert torch.equal(sae.W_enc, sae.W_dec)  # W_enc = W_dec^T in SAELens's (d_in, d_sae) layout
    assert torch.equal(make("relu").W_dec, sae.W_dec) and not torch.equal(make("relu", init_seed=1).W_dec, sae.W_dec)


def test_topk_l0_is_k_and_batchtopk_mean_l0_is_k():
    x = data(50)
    topk = make("topk")(x).acts
    assert topk.counts().tolist() == [K] * 50 and metrics.l0(topk) == K
    sae = make("batchtopk")
    acts = sae(x).acts
    assert acts.values.numel() == K * 50 and metrics.l0(acts) == K and len(set(acts.counts().tolist())) > 1
    assert sae.batchtopk_threshold.item() == pytest.approx(acts.values[acts.values > 0].min().item())


@pytest.mark.parametrize("kind", ["batchtopk", "matryoshka"])
def test_batchtopk_inference_uses_the_learned_threshold(kind):
    sae = make(kind, batchtopk_threshold_lr=0.5)
    x = data(80)
    first = sae(x[:40]).acts.values
    second = sae(x[40:]).acts.values
    expected = 0.5 * first[first > 0].min().double() + 0.5 * second[second > 0].min().double()
    assert sae.batchtopk_threshold.item() == pytest.approx(expected.item())
    sae.eval()
    acts = sae.encode(x)
    pre = (x - sae.b_dec) @ sae.W_enc.t() + sae.b_enc
    dense = torch.where(pre > sae.batchtopk_threshold.float(), pre, 0.0)
    torch.testing.assert_close(acts.to_dense(), dense.detach())


def test_decoder_norm_and_parallel_gradient():
    sae = make("topk")
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
    sae.set_decoder_norm_to_unit()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    sae(data()).loss.backward()
    grad = sae.W_dec.grad.clone()
    sae.remove_parallel_grad()
    w = np64(sae.W_dec)
    along = np.sum(np64(grad) * w, axis=1, keepdims=True) * w
    np.testing.assert_allclose(np.sum(np64(sae.W_dec.grad) * w, axis=1), 0, atol=1e-6)
    np.testing.assert_allclose(np64(sae.W_dec.grad), np64(grad) - along, atol=1e-6)


def weiszfeld_numpy(points: np.ndarray, n_iter: int, eps: float = 1e-8) -> np.ndarray:
    y = points.mean(0)
    for _ in range(n_iter):
        w = 1 / np.maximum(np.linalg.norm(points - y, axis=1), eps)
        y = (w[:, None] * points).sum(0) / w.sum()
    return y


def test_geometric_median_init():
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(200, D_IN, generator=g)
    sample[:20] += 50  # outliers drag the mean, not the median
    np.testing.assert_allclose(np64(geometric_median(sample, n_iter=30, tol=0)), weiszfeld_numpy(np64(sample), 30),
                               rtol=1e-10, atol=1e-12)
    sae = make("relu")
    sae.init_from_data(sample)
    median = weiszfeld_numpy(np64(sample), 500)
    np.testing.assert_allclose(np64(sae.b_dec), median, atol=1e-5)
    assert np.linalg.norm(median) < 0.5 * np.linalg.norm(np64(sample).mean(0))
    sae.init_from_data(sample, method="mean")
    np.testing.assert_allclose(np64(sae.b_dec), np64(sample).mean(0), atol=1e-6)
    with pytest.raises(ConfigError):
        sae.init_from_data(sample[:, :3])


def test_jumprelu_ste_gradients_match_the_analytic_formula():
    """d loss / d threshold from the STE (Rajamanoharan et al. 2024, eq. 11-12), recomputed in numpy."""
    bandwidth, coeff = 0.5, 0.3
    sae = make("jumprelu", jumprelu_bandwidth=bandwidth, l0_coeff=coeff, jumprelu_init_threshold=0.4)
    with torch.no_grad():
        sae.threshold.add_(torch.rand(D_SAE, generator=torch.Generator().manual_seed(1)) * 0.4 - 0.2)
    x = data(40)
    out = sae(x)
    out.loss.backward()
    X, Wd, bd, We, be, t = (np64(p) for p in (x, sae.W_dec, sae.b_dec, sae.W_enc, sae.b_enc, sae.threshold))
    pre = (X - bd) @ We.T + be
    acts = pre * (pre > t)
    x_hat = acts @ Wd + bd
    n = len(X)
    d_acts = 2 * (x_hat - X) @ Wd.T / n  # d mse / d acts
    window = np.abs(pre - t) < bandwidth / 2
    grad_t = -(t / bandwidth) * (window * d_acts).sum(0) - coeff * window.sum(0) / (n * bandwidth)
    np.testing.assert_allclose(np64(sae.threshold.grad), grad_t, rtol=1e-4, atol=1e-5)
    assert out.losses["l0"].item() == pytest.approx((pre > t).sum(1).mean())
    assert window.any() and (grad_t != 0).any()


@pytest.mark.parametrize("kind", ["topk", "matryoshka"])
def test_auxk_loss_against_a_dense_computation(kind):
    sae = make(kind)
    x = data(32)
    out = sae(x)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(2))[:30]] = True
    k_aux = 6
    loss = sae.auxk_loss(x, out.x_hat, dead, k_aux)
    loss.backward()
    pre = np64((x - sae.b_dec) @ sae.W_enc.t() + sae.b_enc)
    masked = np.where(np64(dead).astype(bool), pre, -np.inf)
    top = np.argsort(-masked, axis=1)[:, :k_aux]
    z = np.zeros_like(pre)
    np.put_along_axis(z, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    e = np64(x) - np64(out.x_hat)
    e_hat = z @ np64(sae.W_dec)
    expected = ((e_hat - e) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    live = ~dead
    assert torch.all(sae.W_dec.grad[live] == 0) and torch.all(sae.W_enc.grad[live] == 0)
    assert sae.W_dec.grad[dead].abs().sum() > 0
    assert sae.auxk_loss(x, out.x_hat, torch.zeros(D_SAE, dtype=torch.bool), k_aux).item() == 0
    with pytest.raises(ConfigError):
        sae.auxk_loss(x, out.x_hat, dead[:10], k_aux)


def test_matryoshka_losses_equal_numpy():
    """Every prefix's reconstruction error from the weights, BatchTopK selection included, in float64."""
    sae = SparseAutoencoder(SAEConfig(d_in=8, kind="matryoshka", d_sae=32, k=3, group_sizes=(4, 4, 8, 16)))
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(40, 8, generator=g) + 0.5
    out = sae(x)
    out.loss.backward()
    X, We, be, Wd, bd = (np64(p) for p in (x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    pre = (X - bd) @ We.T + be
    top = np.argsort(-pre, axis=None)[:3 * len(X)]  # k * B over the whole batch
    acts = np.zeros_like(pre)
    acts.flat[top] = np.maximum(pre.flat[top], 0)
    errors, grad_W_dec = [], np.zeros_like(Wd)
    for end in (4, 8, 16, 32):
        residual = acts[:, :end] @ Wd[:end] + bd - X
        errors.append((residual ** 2).sum(1).mean())
        grad_W_dec[:end] += acts[:, :end].T @ (2 * residual / len(X))
    assert (acts > 0).any(0)[:4].any() and (acts > 0).any(0)[16:].any()  # every prefix gets entries
    assert out.loss.item() == pytest.approx(sum(errors), rel=1e-5)
    assert out.losses["matryoshka"].item() == pytest.approx(sum(errors), rel=1e-5)
    assert out.losses["mse"].item() == pytest.approx(errors[-1], rel=1e-5)
    np.testing.assert_allclose(np64(out.x_hat), acts @ Wd + bd, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np64(sae.W_dec.grad), grad_W_dec, rtol=1e-4, atol=1e-5)
    prefixes = sae.prefix_reconstructions(out.acts)
    np.testing.assert_allclose(np64(prefixes[1]), acts[:, :8] @ Wd[:8] + bd, rtol=1e-5, atol=1e-5)


def fit(sae: SparseAutoencoder, batch: Callable[[], torch.Tensor], steps: int, lr: float = 2e-2) -> None:
    """The trainer's inner loop in brief: Adam, tangent decoder gradients, unit decoder rows."""
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    for _ in range(steps):
        out = sae(batch())
        opt.zero_grad()
        out.loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        sae.set_decoder_norm_to_unit()


def test_planted_dictionary_sanity():
    """150 steps of the intended trainer loop on k-sparse codes of a random dictionary (the trainer's tests
    own the real recovery test)."""
    g = torch.Generator().manual_seed(0)
    d, m, k = 16, 32, 3
    atoms = torch.randn(m, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)

    def batch(n=256):
        codes = torch.zeros(n, m).scatter_(1, torch.rand(n, m, generator=g).topk(k, 1).indices,
                                           torch.rand(n, k, generator=g) + 0.5)
        return codes @ atoms

    sae = SparseAutoencoder(SAEConfig(d_in=d, kind="topk", d_sae=2 * m, k=k))
    sae.init_from_data(batch(1024))
    x0 = batch()
    fvu_start = metrics.fvu(x0, sae(x0).x_hat)
    fit(sae, batch, 150)
    fvu_end = metrics.fvu(x0, sae(x0).x_hat)
    assert fvu_end < 0.2 < 0.5 < fvu_start
    cos = (sae.W_dec.detach() @ atoms.t()).max(0).values  # best decoder row for each planted atom
    assert (cos > 0.9).float().mean() > 0.85


def subset_fvu(sae: SparseAutoencoder, x: torch.Tensor, latents: torch.Tensor) -> float:
    """FVU of x reconstructed by b_dec and the given latents alone (inference mode)."""
    acts = sae.eval().encode(x)
    kept = torch.isin(acts.indices, latents)
    return metrics.fvu(x, sae.decode(SparseActs(acts.values * kept, acts.indices, acts.offsets, acts.d_sae)))


def test_matryoshka_first_group_learns_the_frequent_atoms():
    """Zipfian usage of planted atoms: the matryoshka loss makes the first group of 8 latents a good
    reconstruction alone, unlike 8 random latents of the same SAE or the first 8 of a BatchTopK SAE."""
    g = torch.Generator().manual_seed(0)
    d, m, k = 32, 48, 3
    atoms = torch.randn(m, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    usage = 1 / torch.arange(1, m + 1)  # atom i is drawn ~1 / (i + 1) as often as atom 0

    def batch(n=256):
        drawn = torch.multinomial(usage.expand(n, m), k, generator=g)
        return torch.zeros(n, m).scatter_(1, drawn, torch.rand(n, k, generator=g) + 0.5) @ atoms

    x0 = batch(1024)
    first = torch.arange(8)
    fvus = {}
    for kind, groups in (("matryoshka", (8, 8, 16, 32)), ("batchtopk", None)):
        sae = SparseAutoencoder(SAEConfig(d_in=d, kind=kind, d_sae=64, k=k, group_sizes=groups))
        sae.init_from_data(batch(1024))
        fit(sae, batch, 100)
        fvus[kind] = subset_fvu(sae, x0, first)
        if kind == "matryoshka":
            fvus["random"] = np.mean([subset_fvu(sae, x0, torch.randperm(64, generator=g)[:8]) for _ in range(10)])
            fvus["all"] = subset_fvu(sae, x0, torch.arange(64))
    assert fvus["all"] < 0.25  # seeds 0-2 gave 0.13-0.16; first group 0.51-0.57; random, BatchTopK 0.97-1.16
    assert fvus["matryoshka"] < fvus["random"] - 0.25 and fvus["matryoshka"] < fvus["batchtopk"] - 0.25


# metrics --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_metrics_equal_numpy(sparse):
    g = torch.Generator().manual_seed(5)
    n, m = 40, 30
    x, x_hat = torch.randn(n, D_IN, generator=g) + 1, torch.randn(n, D_IN, generator=g)
    acts = torch.relu(torch.randn(n, m, generator=g) - 1.0)
    acts[:, :3] = 0  # dead latents
    acts[:, 3] = 1.0  # a dense one
    if sparse:
        rows, cols = acts.nonzero(as_tuple=True)
        measured = SparseActs(acts[rows, cols], cols, csr_offsets(rows, n), m)
        torch.testing.assert_close(measured.to_dense(), acts)
    else:
        measured = acts
    X, Xh, A = np64(x), np64(x_hat), np64(acts)
    err = (X - Xh) ** 2
    fired = (A != 0).sum(0)
    expected = {"mse": err.mean(), "sse_per_token": err.sum(1).mean(),
                "fvu": err.sum() / ((X - X.mean(0)) ** 2).sum(), "l0": (A != 0).sum(1).mean(),
                "l1": np.abs(A).sum(1).mean(),
                "dead_fraction": (fired == 0).mean(), "dense_fraction": (fired / n > 0.1).mean()}
    got = metrics.batch_metrics(x, x_hat, measured)
    assert got == pytest.approx(expected, rel=1e-12)
    for name in ("mse", "sse_per_token", "fvu"):
        assert getattr(metrics, name)(x, x_hat) == pytest.approx(expected[name], rel=1e-12)
    assert metrics.l0(measured) == pytest.approx(expected["l0"])
    assert metrics.l1(measured) == pytest.approx(expected["l1"])
    counts = metrics.firing_counts(measured)
    np.testing.assert_array_equal(counts.numpy(), fired)
    np.testing.assert_allclose(metrics.firing_frequency(counts, n).numpy(), fired / n)
    assert metrics.dead_fraction(counts) == pytest.approx(3 / m)
    assert metrics.dense_fraction(counts, n, threshold=0.5) == pytest.approx((fired / n > 0.5).mean())


# checkpoints ----------------------------------------------------------------------------------

def trained(kind: str, dtype: str = "float32") -> SparseAutoencoder:
    """An SAE with non-trivial parameters (and, for batchtopk, a learned threshold)."""
    sae = make(kind, dtype=dtype)
    x = data(64, seed=9)
    sae.init_from_data(x)
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)
    sae(x)  # batchtopk: sets the inference threshold
    return sae.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_round_trip(tmp_path, kind):
    sae = trained(kind)
    norm = Normalization(layer="10", tokens="patches", mean=torch.randn(D_IN), scale=0.37)
    save(sae, str(tmp_path / "ckpt"), normalization=norm, extra={"step": 12})
    loaded, norm2 = load(str(tmp_path / "ckpt"))
    assert loaded.cfg == sae.cfg and not loaded.training
    for name, t in sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], t, rtol=0, atol=0, equal_nan=True)
    x = data(16, seed=1)
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat, rtol=0, atol=0)
    assert torch.equal(norm2.mean, norm.mean) and (norm2.scale, norm2.layer, norm2.tokens) == (0.37, "10", "patches")
    assert read_extra(str(tmp_path / "ckpt")) == {"step": 12}
    cfg = json.loads((tmp_path / "ckpt" / "cfg.json").read_text())
    assert cfg["kind"] == kind and cfg["normalization"]["scale"] == 0.37


def test_matryoshka_checkpoint_keeps_group_sizes(tmp_path):
    sae = SparseAutoencoder(SAEConfig(d_in=D_IN, kind="matryoshka", d_sae=D_SAE, k=K, group_sizes=(16, 16, 64)))
    x = data(32, seed=3)
    sae(x)  # sets the inference threshold
    save(sae.eval(), str(tmp_path / "ckpt"))
    assert json.loads((tmp_path / "ckpt" / "cfg.json").read_text())["group_sizes"] == [16, 16, 64]
    loaded, _ = load(str(tmp_path / "ckpt"))
    assert loaded.cfg == sae.cfg and loaded.cfg.group_sizes == (16, 16, 64)
    assert torch.equal(loaded.prefix_ends, torch.tensor([16, 32, 96]))
    expected, got = sae(x), loaded(x)
    assert got.losses["matryoshka"].item() == expected.losses["matryoshka"].item()
    torch.testing.assert_close(got.x_hat, expected.x_hat, rtol=0, atol=0)


def test_checkpoint_bf16_and_errors(tmp_path):
    sae = trained("topk", dtype="bfloat16")
    save(sae, str(tmp_path / "a"))
    loaded, norm = load(str(tmp_path / "a"))
    assert norm is None and loaded.W_enc.dtype == torch.bfloat16 and torch.equal(loaded.W_enc, sae.W_enc)
    with pytest.raises(StoreNotFoundError):
        load(str(tmp_path / "nothing"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "cfg.json").write_text(json.dumps({"d_in": 3}))
    with pytest.raises(StoreFormatError):
        load(str(tmp_path / "b"))


def saelens_forward(tensors: dict[str, np.ndarray], cfg: dict, x: np.ndarray) -> np.ndarray:
    """SAELens's standard / topk / jumprelu inference forward, written from its source, in numpy."""
    sae_in = x - tensors["b_dec"] if cfg["apply_b_dec_to_input"] else x
    hidden_pre = sae_in @ tensors["W_enc"] + tensors["b_enc"]
    if cfg["architecture"] == "standard":
        acts = np.maximum(hidden_pre, 0)
    elif cfg["architecture"] == "topk":
        top = np.argsort(-hidden_pre, axis=1)[:, :cfg["k"]]
        acts = np.zeros_like(hidden_pre)
        np.put_along_axis(acts, top, np.maximum(np.take_along_axis(hidden_pre, top, 1), 0), 1)
    else:
        acts = np.maximum(hidden_pre, 0) * (hidden_pre > np.maximum(tensors["threshold"], 0))
    return acts @ tensors["W_dec"] + tensors["b_dec"]


@pytest.mark.parametrize("kind", KINDS)
def test_export_saelens_reproduces_our_output(tmp_path, kind):
    from safetensors.numpy import load_file

    sae = trained(kind)
    norm = Normalization(layer=None, tokens=None, mean=torch.randn(D_IN) * 3, scale=0.25)
    export_saelens(sae, str(tmp_path / "sl"), normalization=norm)
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    tensors = {k: v.astype(np.float64) for k, v in load_file(str(tmp_path / "sl" / "sae_weights.safetensors")).items()}
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk"}.get(kind, "jumprelu")
    assert (cfg["d_in"], cfg["d_sae"], cfg["normalize_activations"]) == (D_IN, D_SAE, "none")
    assert tensors["W_enc"].shape == (D_IN, D_SAE) and tensors["W_dec"].shape == (D_SAE, D_IN)
    assert ("threshold" in tensors) == (kind in ("jumprelu", "batchtopk", "matryoshka"))
    if kind == "topk":
        assert cfg["k"] == K and cfg["activation_fn_kwargs"] == {"k": K}
    if kind == "matryoshka":
        assert cfg["metadata"]["group_sizes"] == [6, 6, 12, 24, 48]
        assert cfg["metadata"]["matryoshka_widths"] == [6, 12, 24, 48, 96]
    raw = data(32, seed=2) * 4 + 1  # raw backbone activations: the export folds the normalization in
    ours = norm.undo(sae(norm.apply(raw)).x_hat)
    np.testing.assert_allclose(saelens_forward(tensors, cfg, np64(raw)), np64(ours), rtol=1e-4, atol=1e-4)
