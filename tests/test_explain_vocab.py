"""Vocabulary names and embedding scores of `actstore explain` on a CLIP store, against open_clip's own embeddings.

steer_setup's index: 96 shapes through a random-weight open_clip ViT-S/32, a TopK SAE on layer 10. The words and
their scores are recomputed here with open_clip's encode_image / encode_text on the same seeded model, the silent
images by encoding the store with the SAE in numpy, and the AUROC with scikit-learn.
"""

from __future__ import annotations

import shutil

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score

import sae
from actstore.extract.backbones import BackboneConfig, load_backbone
from actstore.store import ActivationStore
from actstore_cli import main
from services.api.reader import IndexReader
from services.explain import read_explanations
from services.explain.examples import examples

WORDS = ["red", "green", "blue", "yellow", "circle", "square", "triangle", "star", "stripes", "dots", "a dog",
         "the sky", "text"]
TEMPLATE = "a photo of a {}."


@pytest.fixture(scope="module")
def explained(steer_setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("explain-vocab")
    index = root / "index"
    shutil.copytree(steer_setup["index"], index)  # the session's index stays as it was
    (root / "words.txt").write_text("# colours\n" + "\n".join(WORDS) + "\nred\n")
    assert main(["explain", "--index", str(index), "--vocabulary", str(root / "words.txt"), "--features", "densest:5",
                 "--n-pool", "1000", "--n-held-out", "6", "-q"]) == 0
    return index, steer_setup


def _open_clip_embeddings(store: ActivationStore, uris: list[str]) -> torch.Tensor:
    """Unit image embeddings of open_clip's own model (seeded as the store's), images preprocessed as it saw them."""
    meta = store.attrs["backbone"]
    backbone = load_backbone(BackboneConfig(f"open_clip:{meta['name']}", layers=("10",),
                                            init_seed=int(meta["init_seed"])))
    torch.manual_seed(int(meta["init_seed"]))
    model = open_clip.create_model(meta["name"]).eval()
    pixels = torch.stack([backbone.preprocessor(Image.open(u).convert("RGB")) for u in uris])
    with torch.no_grad():
        return F.normalize(model.encode_image(backbone.normalize(pixels)), dim=-1), model


def test_words_and_scores_equal_open_clips(explained):
    index, setup = explained
    rows = [r for r in read_explanations(index).to_pylist() if r["explainer"] == "vocabulary"]
    reader = IndexReader(index)
    store = ActivationStore(setup["store"])
    ok = [i for i in range(reader.n_images) if reader.images["ok"][i]]
    uris = [reader.images["uri"][i].as_py() for i in range(reader.n_images)]
    images, model = _open_clip_embeddings(store, uris)
    tok = open_clip.get_tokenizer(store.attrs["backbone"]["name"])
    with torch.no_grad():
        text = F.normalize(model.encode_text(tok([TEMPLATE.format(w) for w in WORDS])), dim=-1)
    reference = F.normalize(images[ok].mean(0), dim=0)  # the pool: every ok image (n_pool >= the store)
    assert len(rows) == 5 and len({r["feature"] for r in rows}) == 5
    for r in rows:
        top = [int(i) for i in reader.array("top_images")[r["feature"]][:6] if i >= 0]
        assert r["shown"][:len(top)] == top
        scores = text @ F.normalize(images[top].mean(0), dim=0) - text @ reference
        best = scores.topk(5)
        assert r["words"] == [WORDS[i] for i in best.indices.tolist()]
        np.testing.assert_allclose(r["word_scores"], best.values.numpy(), atol=2e-4)
        assert r["explanation"] == r["words"][0] and r["model"] == f"open_clip:{store.attrs['backbone']['name']}"
        assert r["detection_n"] == 0 and r["detection_accuracy"] is None and r["judge"] is None


def test_embedding_auroc_equals_scikit_learns(explained):
    index, setup = explained
    rows = [r for r in read_explanations(index).to_pylist() if r["explainer"] == "vocabulary"]
    reader = IndexReader(index)
    store = ActivationStore(setup["store"])
    model_sae, norm = sae.load(setup["sae"])
    x = store.read("10").float()[:, 1:]  # patches (the CLS token first)
    with torch.no_grad():
        z = model_sae.encode(norm.apply(x.reshape(-1, x.shape[-1])) if norm is not None else x.reshape(-1, x.shape[-1]))
    z = z.to_dense() if hasattr(z, "to_dense") else z
    image_max = z.reshape(x.shape[0], x.shape[1], -1).amax(1).numpy()
    ok = np.array([bool(reader.images["ok"][i]) for i in range(reader.n_images)])
    uris = [reader.images["uri"][i].as_py() for i in range(reader.n_images)]
    images, model = _open_clip_embeddings(store, uris)
    tok = open_clip.get_tokenizer(store.attrs["backbone"]["name"])
    arrays = {n: reader.array(n) for n in ("top_images", "heatmaps", "band_images")}
    for r in rows:
        f = r["feature"]
        silent = np.flatnonzero(ok & (image_max[:, f] <= 0))
        ex = examples(arrays, f, silent, 6, 2, 6, 0)
        assert not set(ex.activating + ex.silent) & set(r["shown"])  # held out: never an image the explainer saw
        assert (image_max[ex.activating, f] > 0).all() and (image_max[ex.silent, f] == 0).all()
        with torch.no_grad():
            t = F.normalize(model.encode_text(tok([TEMPLATE.format(r["explanation"])])), dim=-1)[0]
        held = ex.activating + ex.silent
        expected = roc_auc_score([1] * len(ex.activating) + [0] * len(ex.silent), (images[held] @ t).numpy())
        assert r["embedding_auroc"] == pytest.approx(expected, abs=1e-6)
