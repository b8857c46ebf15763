"""Causal checks on generated shapes (conftest's steer_setup: a trained SAE on layer 10 of a random-weight open_clip
ViT-S/32, probes on layer 11): every head's clean output, suppressing a colour's features flips the colour probe,
suppressing a shape's features lowers its segmentation IoU, each more than as many random live features; the
associations that pick the features stream (per-class sums, block by block under a memory budget) and equal the means
over a dense (images x patches x features) array."""

from __future__ import annotations

import pytest
import torch

from sae.edits import FeatureEdit
from services.steer import Steerer


def test_probes_beat_chance_and_no_edit_is_clean_for_every_head(steer_setup) -> None:
    from services.probe import load_probe

    seg, color = load_probe(steer_setup["seg"]), load_probe(steer_setup["color"])
    # background is most patches; a random ViT's patch tokens find the shape (foreground) well but tell the six
    # shapes apart poorly, so the margin is on mIoU against the majority predictor's (IoU = chance on background)
    chance_miou = seg.metrics["chance"] / len(seg.metrics["iou"])
    assert seg.metrics["miou"] > 1.4 * chance_miou and seg.metrics["accuracy"] > seg.metrics["chance"], seg.metrics
    assert color.metrics["accuracy"] > color.metrics["chance"] + 0.25, color.metrics
    s = Steerer(steer_setup["sae"])
    images = s.image(11)
    tokens = s.model.backbone(images, layers=["11"])["11"]
    embedding = s.model.backbone.outputs(images)[0]
    for name, expect in (("probe:" + steer_setup["seg"], seg.logits(tokens)[0].softmax(-1).mean(0)),
                         ("probe:" + steer_setup["color"], color.logits(tokens)[0].softmax(-1)),  # patch mean
                         ("zeroshot", s.head("zeroshot").logits(images)[0].softmax(-1))):
        r = s.steer(images, [], s.head(name))
        assert r["before"] == r["after"]
        assert [c for c, _ in r["before"]["top5"]] == expect.topk(5).indices.tolist(), name
    assert embedding.shape[0] == 1
    mask = s.steer(images, [], s.head("probe:" + steer_setup["seg"]))["before"]["mask"]
    assert torch.equal(torch.tensor(mask).flatten(), seg.logits(tokens)[0].argmax(-1))


def test_suppressing_a_colours_features_flips_the_colour_probe_more_than_random_features(steer_setup) -> None:
    """Planted causal check: for each of three colours, its 8 most associated features (mean activation over its
    images' patches against the others') set to 0 on every patch flip the colour probe's prediction on more of its
    images than 8 random live features do (3 draws). Measured: 12 of 24 flips against 0."""
    import numpy as np
    import pyarrow.parquet as pq

    from services.steer.experiment import association, top_features

    s = Steerer(steer_setup["sae"])
    head = s.head("probe:" + steer_setup["color"])
    colors = pq.read_table(steer_setup["root"] / "images" / "factors.parquet").column("color").to_pylist()
    names = sorted(set(colors))
    assoc = association(s, np.array([names.index(c) for c in colors]))  # each image's colour on all its patches
    live = assoc.live.numpy()
    rng = np.random.default_rng(0)
    flips_top = flips_random = 0
    for color in ("red", "blue", "green"):
        member = torch.tensor([c == color for c in colors])
        top = top_features(assoc.score(names.index(color)), 8)
        draws = [rng.choice(np.setdiff1d(live, top), 8, replace=False).tolist() for _ in range(3)]
        for i in torch.nonzero(member).flatten().tolist()[:8]:
            x = s.image(i)
            clean = s.steer(x, [], head)["before"]["top5"][0][0]

            def flipped(features: list[int]) -> int:
                r = s.steer(x, [FeatureEdit(int(f), "set", 0.0) for f in features], head)
                return int(r["after"]["top5"][0][0] != clean)
            flips_top += flipped(top)
            flips_random += sum(flipped(d) for d in draws) / 3
    print(f"flips: top features {flips_top}, random features {flips_random:.2f}")
    assert flips_top >= 6 and flips_top > 3 * flips_random + 2


def test_segmentation_suppression_lowers_the_class_iou_more_than_random(steer_setup) -> None:
    from services.steer.experiment import segmentation_suppression

    s = Steerer(steer_setup["sae"])
    rows = segmentation_suppression(s, s.head("probe:" + steer_setup["seg"]), n_features=8, n_random=2,
                                    max_images=8, classes=[1, 4, 6], memory_gb=0.004, progress=False)
    for r in rows:
        print(r.to_dict())
    assert sum(r.drop_top for r in rows) > sum(r.drop_random for r in rows)


def test_associations_stream_the_dense_means_under_any_budget(steer_setup, monkeypatch) -> None:
    """Per class, the streamed score (per-class sums of the SAE's positive entries, folded block by block) equals the
    member-minus-others mean over a dense (images, patches, d_sae) array of the SAE on every stored patch computed
    here, for the store's per-patch labels and for a label per image; under a budget of a few images per block and
    under the default one (the whole store in a block); the live features are those positive somewhere. A budget
    that cannot hold the SAE is one line."""
    import numpy as np
    import pyarrow.parquet as pq

    from actstore.errors import ConfigError
    from actstore.store import ActivationStore, ok_mask
    from sae import SparseActs
    from services.steer.experiment import association

    s = Steerer(steer_setup["sae"])
    m, p = s.model, s.layout.n_patches
    x = s.store.read(m.layer)[:, int(s.layout.cls):].reshape(-1, m.spec.d).float()
    with torch.no_grad():
        z = m.sae.encode((m.norm.apply(x) if m.norm is not None else x).to(m.sae.W_enc.dtype))
    dense = (z.to_dense() if isinstance(z, SparseActs) else z).float().reshape(-1, p, m.sae.cfg.d_sae)
    ok = ok_mask(s.images)
    colors = pq.read_table(steer_setup["root"] / "images" / "factors.parquet").column("color").to_pylist()
    per_image = np.array([sorted(set(colors)).index(c) for c in colors])
    sizes: list[int] = []
    blocks = ActivationStore.blocks
    monkeypatch.setattr(ActivationStore, "blocks",
                        lambda store, layer, n, **kw: sizes.append(n) or blocks(store, layer, n, **kw))
    per_patch = s.store.labels().astype(np.int64)
    for labels, per_token in ((None, per_patch), (per_image, np.repeat(per_image[:, None], p, 1))):
        flat, flat_labels = dense[ok].reshape(-1, dense.shape[-1]), torch.from_numpy(per_token[ok].reshape(-1))
        sizes.clear()
        small, big = association(s, labels, memory_gb=0.004), association(s, labels)
        assert 1 < sizes[0] < 16 and sizes[1] == s.store.n_images, sizes
        classes = sorted(set(flat_labels.tolist()))
        assert small.classes == big.classes == tuple(classes) and len(classes) > 2
        for c in classes:
            member = flat_labels == c
            expect = flat[member].mean(0) - flat[~member].mean(0)
            torch.testing.assert_close(small.score(c), expect, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(big.score(c), expect, rtol=1e-5, atol=1e-6)
        live = torch.nonzero(flat.amax(0) > 0).flatten()
        assert torch.equal(small.live, live) and torch.equal(big.live, live)
    with pytest.raises(ConfigError, match=r"^steering experiment: --memory-gb 0.001 is too small: it needs [^\n]*$"):
        association(s, memory_gb=0.001)
