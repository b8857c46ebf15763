"""`actstore evaluate`: an SAE spliced into the store's backbone over images. FVU and L0 equal the SAE on the store's
own activations of the same images; an exact SAE recovers everything, a zero decoder is zero ablation; zero-shot heads
equal open_clip's own zero-shot recipe; bad input is one line and loses nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from actstore.errors import ConfigError
from actstore.extract.backbones import BackboneConfig, load_backbone
from actstore.extract.zeroshot import zero_shot_classifier
from actstore.loader import Normalization
from actstore.store import ActivationStore
from actstore_cli import main
from sae import SAEConfig, SparseAutoencoder, checkpoint, metrics
from services.evaluate import EvaluateConfig, run_evaluate
from test_splice import exact_sae

LAYER = "10"


@pytest.fixture(scope="module")
def paths(service_store: Path) -> dict[str, str]:
    return {"store": str(service_store / "store"), "images": str(service_store / "images"),
            "sae": str(service_store / "sae")}


def save(sae: SparseAutoencoder, folder: Path, store: str | None, norm: Normalization | None = None) -> str:
    checkpoint.save(sae, str(folder), normalization=norm, extra={"store": store, "layer": LAYER} if store else {})
    return str(folder)


def test_cli_evaluate_equals_the_sae_on_the_stored_activations(paths: dict[str, str], index_dir, tmp_path: Path,
                                                              capsys) -> None:
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--sae", paths["sae"], "--store", paths["store"], "--images", paths["images"],
                 "--json", str(out), "--batch-size", "10", "--max-images", "24", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "the model's classifier" in printed and "recovered" in printed
    r = json.loads(out.read_text())
    assert {"n_images", "fvu", "l0", "embedding_cosine", "kl", "top1_agreement", "recovered"} <= set(r)
    print(printed)
    assert r["n_images"] == 24 and r["head"] == "model" and r["backbone"] == "timm:vit_tiny_patch16_224"
    for key in ("embedding_cosine", "kl", "top1_agreement"):
        assert set(r[key]) == {"spliced", "zero_ablation", "mean_ablation"}
        assert all(v is not None and np.isfinite(v) for v in r[key].values())
    assert all(0 <= v <= 1 for v in r["top1_agreement"].values())
    assert all(v >= 0 for v in r["kl"].values())
    assert r["fidelity"]["checked"] and r["fidelity"]["max_abs_diff"] < 0.05

    # independent: timm's model with our own forward hooks, not the splice code: each pass's metrics and recovered
    expected = independent_passes(paths, 24)
    for key in ("embedding_cosine", "kl", "top1_agreement"):
        for p in ("spliced", "mean_ablation", "zero_ablation"):
            assert r[key][p] == pytest.approx(expected[key][p], rel=1e-3, abs=1e-5), (key, p)
    for key, clean in (("embedding_cosine", 1.0), ("kl", 0.0)):
        m = expected[key]
        assert r["recovered"][key] == pytest.approx((m["mean_ablation"] - m["spliced"]) / (m["mean_ablation"] - clean),
                                                    rel=1e-3)

    # independent: the same SAE on the store's activations of the same images (the store is float16)
    sae, norm = checkpoint.load(paths["sae"])
    store = ActivationStore(paths["store"])
    x = store.read(LAYER, 0, 24)[:, 1:].reshape(-1, store.layer(LAYER).d).float()
    with torch.no_grad():
        x_n = norm.apply(x)
        acts = sae.encode(x_n)
        x_hat = sae.decode(acts)
    assert r["fvu"] == pytest.approx(metrics.fvu(x_n, x_hat), rel=2e-2)
    assert r["l0"] == pytest.approx(metrics.l0(acts), rel=2e-2)

    # the result is ours: replaced only with --overwrite; anything else at the path is refused, untouched
    assert main(["evaluate", "--sae", paths["sae"], "--store", paths["store"], "--images", paths["images"],
                 "--json", str(out), "-q"]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}')
    assert main(["evaluate", "--sae", paths["sae"], "--store", paths["store"], "--images", paths["images"],
                 "--json", str(foreign), "--overwrite", "-q"]) == 1
    assert "is not an evaluate result; refusing" in capsys.readouterr().err
    assert foreign.read_text() == '{"mine": 1}'


def independent_passes(paths: dict[str, str], n: int) -> dict[str, dict[str, float]]:
    """evaluate's three passes recomputed from timm's own model (seeded as the store's record says) with plain forward
    hooks on block 10's patch tokens: the SAE's reconstruction, zeros, the store's patch mean."""
    import timm

    from actstore.extract.sources import build_manifest
    from services.spliced import decode_images

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    sae, norm = checkpoint.load(paths["sae"])
    store = ActivationStore(paths["store"])
    mean = torch.from_numpy(store.stats(LAYER, "patches").mean.astype(np.float32))
    uris = build_manifest(paths["images"]).uris[:n]
    pixels, _ = decode_images(load_backbone(BackboneConfig("timm:vit_tiny_patch16_224")), uris)
    cfg = model.pretrained_cfg
    x = (pixels.float() / 255 - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    replace = {"spliced": lambda t: norm.undo(sae.decode(sae.encode(norm.apply(t.flatten(0, 1))))).view_as(t),
               "zero_ablation": torch.zeros_like, "mean_ablation": lambda t: mean.expand_as(t)}

    def run(fn=None):
        hook = None if fn is None else model.blocks[int(LAYER)].register_forward_hook(
            lambda m, a, out: torch.cat([out[:, :1], fn(out[:, 1:])], 1))
        with torch.no_grad():
            emb = model.forward_head(model.forward_features(x), pre_logits=True)
            logits = model.get_classifier()(emb)
        if hook is not None:
            hook.remove()
        return emb.double(), logits.double()

    clean_emb, clean_logits = run()
    out: dict[str, dict[str, float]] = {"embedding_cosine": {}, "kl": {}, "top1_agreement": {}}
    for name, fn in replace.items():
        emb, logits = run(fn)
        p, q = clean_logits.log_softmax(-1), logits.log_softmax(-1)
        out["embedding_cosine"][name] = float(F.cosine_similarity(clean_emb, emb, dim=-1).mean())
        out["kl"][name] = float((p.exp() * (p - q)).sum(-1).mean())
        out["top1_agreement"][name] = float((clean_logits.argmax(-1) == logits.argmax(-1)).double().mean())
    return out


def test_exact_sae_recovers_everything_and_zero_decoder_is_zero_ablation(paths: dict[str, str], tmp_path: Path
                                                                        ) -> None:
    store = ActivationStore(paths["store"])
    d = store.layer(LAYER).d
    norm = Normalization.from_stats(store.stats(LAYER, "patches"), LAYER, "patches")
    exact = save(exact_sae(d), tmp_path / "exact", paths["store"], norm)
    r = run_evaluate(EvaluateConfig(sae=exact, images=paths["images"], max_images=12), progress=False)
    assert r["n_images"] == 12 and r["fvu"] < 1e-10
    assert r["embedding_cosine"]["spliced"] == pytest.approx(1.0, abs=1e-6)
    assert r["kl"]["spliced"] == pytest.approx(0.0, abs=1e-6) and r["top1_agreement"]["spliced"] == 1.0
    assert r["recovered"]["embedding_cosine"] == pytest.approx(1.0, abs=1e-4)
    assert r["recovered"]["kl"] == pytest.approx(1.0, abs=1e-4)

    zero = SparseAutoencoder(SAEConfig(d_in=d, d_sae=2 * d, kind="relu"))
    with torch.no_grad():
        zero.W_dec.zero_()
    r = run_evaluate(EvaluateConfig(sae=save(zero, tmp_path / "zero", paths["store"]), images=paths["images"],
                                    max_images=12), progress=False)
    for key, clean in (("embedding_cosine", 1.0), ("kl", 0.0), ("top1_agreement", 1.0)):
        m = r[key]
        assert m["spliced"] == pytest.approx(m["zero_ablation"], abs=1e-6)
        assert (m["zero_ablation"] - m["spliced"]) / (m["zero_ablation"] - clean) == pytest.approx(0.0, abs=1e-4)


def test_zero_shot_head_equals_open_clips_recipe() -> None:
    cfg = BackboneConfig("open_clip:ViT-S-32-alt", layers=(3,), init_seed=5)
    backbone = load_backbone(cfg)
    names = ["circle", "square", "triangle"]
    head = zero_shot_classifier(cfg, names, "a photo of a {}.")
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    embedding, logits = backbone.outputs(x)
    assert logits is None
    import open_clip  # the recipe of open_clip's README, on the same seeded model

    torch.manual_seed(5)
    model = open_clip.create_model("ViT-S-32-alt").eval()
    tok = open_clip.get_tokenizer("ViT-S-32-alt")
    with torch.no_grad():
        image = F.normalize(model.encode_image(backbone.normalize(x)), dim=-1)
        text = F.normalize(model.encode_text(tok([f"a photo of a {n}." for n in names])), dim=-1)
        expected = model.logit_scale.exp() * image @ text.T
    torch.testing.assert_close(head(embedding), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="timm models have no text tower"):
        zero_shot_classifier(BackboneConfig("timm:vit_tiny_patch16_224"), names)
    with pytest.raises(ConfigError, match="must contain"):
        zero_shot_classifier(cfg, names, "a photo")


def test_errors_are_one_line(paths: dict[str, str], tmp_path: Path, capsys) -> None:
    wrong = save(SparseAutoencoder(SAEConfig(d_in=16, d_sae=32, kind="relu")), tmp_path / "wrong", paths["store"])
    assert main(["evaluate", "--sae", wrong, "--images", paths["images"], "-q"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reads 16-wide activations; layer 10 of" in err
    bare = save(SparseAutoencoder(SAEConfig(d_in=192, d_sae=32, kind="relu")), tmp_path / "bare", None)
    assert main(["evaluate", "--sae", bare, "--images", paths["images"], "-q"]) == 1
    assert "does not record its store; pass --store" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        EvaluateConfig(sae=bare, images=paths["images"], batch_size=0)


def test_hf_zero_shot_head_equals_transformers_logits(tmp_path: Path) -> None:
    """A tiny CLIP (both towers, a byte-level tokenizer) saved as a folder: our head on the image tower's pooled
    output equals CLIPModel's own logits_per_image."""
    import transformers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: i + 2 for i, c in enumerate(chars)},
             **{c + "</w>": i + 2 + len(chars) for i, c in enumerate(chars)}}
    transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=40).save_pretrained(tmp_path)
    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    config = transformers.CLIPConfig(vision_config={**tiny, "image_size": 32, "patch_size": 8}, projection_dim=16,
                                     text_config={**tiny, "vocab_size": len(vocab), "max_position_embeddings": 40,
                                                  "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1})
    transformers.CLIPModel(config).save_pretrained(tmp_path)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                                    ).save_pretrained(tmp_path)
    cfg = BackboneConfig(f"hf:{tmp_path}", layers=(1,), pretrained="hub")
    names = ["cat", "dog", "shape"]
    head = zero_shot_classifier(cfg, names)
    backbone = load_backbone(cfg)
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    full = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    ids = transformers.AutoTokenizer.from_pretrained(tmp_path)([f"a photo of a {n}." for n in names],
                                                               padding="max_length", truncation=True,
                                                               return_tensors="pt")
    with torch.no_grad():
        expected = full(pixel_values=backbone.normalize(x), **ids).logits_per_image
    torch.testing.assert_close(head(backbone.outputs(x)[0]), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="random weights has no tokenizer here"):
        zero_shot_classifier(BackboneConfig("hf:clip-vit-base-patch32"), names)
