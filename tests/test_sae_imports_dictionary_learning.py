"""dictionary_learning run folders read as ours: written by dictionary-learning 0.1.0's own trainSAE (ae.pt +
config.json, its activation normalization folded into the saved weights), our codes and reconstructions equal those
of the SAE its own utils.load_dictionary returns, on raw activations of a store.

The refusals are written as trainSAE writes a run folder (config.json = {"trainer": trainer.config}, ae.pt = the
state dict), or, for the resume backup that upstream's trainSAE (60ec6bf; 0.1.0 has none) leaves in ae.pt while a
run is unfinished, as that version's training.py writes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from actstore.errors import ConfigError
from actstore.store import ActivationStore
from sae import checkpoint

LAYER = "10"
STEPS = 8
DICT_SIZE = 96


def tokens(store: ActivationStore, start: int, stop: int) -> torch.Tensor:
    return store.read(LAYER, start, stop)[:, 1:].reshape(-1, store.layer(LAYER).d).float()


def dense(acts) -> torch.Tensor:
    return acts.to_dense() if hasattr(acts, "to_dense") else acts


def train_run(path: Path, data: list[torch.Tensor], trainer: str, **settings) -> Path:
    """A run folder written by dictionary_learning's trainSAE: STEPS steps at a high rate (biases and thresholds
    move off their start), the activations normalized to unit mean squared norm (the factor folded at the end)."""
    import dictionary_learning.trainers as trainers
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
    from dictionary_learning.trainers.standard import StandardTrainerAprilUpdate
    from dictionary_learning.training import trainSAE

    classes = {"StandardTrainerAprilUpdate": StandardTrainerAprilUpdate,
               "MatryoshkaBatchTopKTrainer": MatryoshkaBatchTopKTrainer}
    torch.manual_seed(0)
    cfg = {"trainer": classes.get(trainer) or getattr(trainers, trainer), "steps": STEPS,
           "activation_dim": data[0].shape[1], "dict_size": DICT_SIZE, "layer": int(LAYER),
           "lm_name": "timm/vit_tiny_patch16_224", "submodule_name": f"resid_post_layer_{LAYER}",
           "warmup_steps": 0, "lr": 1e-2, "device": "cpu", **settings}
    trainSAE(data, [cfg], steps=STEPS, save_dir=str(path), normalize_activations=True, device="cpu")
    return path / "trainer_0"


@pytest.mark.parametrize("trainer, settings, kind", [
    ("StandardTrainer", {"sparsity_warmup_steps": None}, "relu"),
    ("StandardTrainerAprilUpdate", {"sparsity_warmup_steps": None}, "relu"),  # decoder columns not unit
    ("TopKTrainer", {"k": 8, "threshold_start_step": 0}, "topk"),
    ("BatchTopKTrainer", {"k": 8, "threshold_start_step": 0}, "batchtopk"),
    ("BatchTopKTrainer", {"k": 8}, "batchtopk"),  # threshold never calibrated (-1): the peer encodes ReLU
    ("MatryoshkaBatchTopKTrainer", {"k": 8, "group_fractions": [0.25, 0.75], "threshold_start_step": 0},
     "matryoshka"),
    ("JumpReluTrainer", {"sparsity_warmup_steps": None}, "jumprelu"),
])
def test_codes_equal_dictionary_learning_encode(service_store, tmp_path, trainer, settings, kind):
    from dictionary_learning.utils import load_dictionary

    store = ActivationStore(str(service_store / "store"))
    data = list(tokens(store, 0, 16).split(256))
    folder = train_run(tmp_path, data, trainer, **settings)
    state = torch.load(folder / "ae.pt", weights_only=True)
    assert all(state[key].abs().max() > 1e-2 for key in ("encoder.bias", "b_enc", "bias", "b_dec") if key in state)
    if trainer == "StandardTrainerAprilUpdate":  # load_dictionary rescales its latents to unit decoder columns
        assert not torch.allclose(state["decoder.weight"].norm(dim=0), torch.ones(DICT_SIZE))
    if kind in ("batchtopk", "matryoshka"):  # calibrated, or -1 before threshold_start_step
        assert state["threshold"] > 0 if "threshold_start_step" in settings else state["threshold"] == -1
    if kind == "jumprelu":  # moved off their start (0.001 * the norm factor), some below 0
        assert state["threshold"].max() > 0.1 and state["threshold"].min() < 0
    x = tokens(store, 16, 20)  # raw activations: the saved SAE has the norm factor folded in
    peer, _ = load_dictionary(str(folder), device="cpu")
    with torch.no_grad():
        expected = peer.encode(x)
        peer_decoded = peer.decode(expected)
        sae, norm = checkpoint.load(str(folder))  # found from its files
        named, _ = checkpoint.load(f"dictionary_learning:{folder / 'ae.pt'}")
        acts = sae.encode(x)
        ours, decoded = dense(acts), sae.decode(acts)
        assert torch.equal(ours, dense(named.encode(x)))
    assert sae.cfg.kind == kind and sae.cfg.d_sae == DICT_SIZE and norm is None
    if kind == "matryoshka":
        assert sae.cfg.group_sizes == (24, 72)
    assert (expected > 0).any(dim=1).float().mean() > 0.5 and ((expected > 0) == (ours > 0)).float().mean() > 0.999
    difference = (ours - expected).abs().max().item()
    assert difference < 1e-4 * max(1.0, expected.abs().max().item()), difference
    rec_difference = (decoded - peer_decoded).abs().max().item()
    assert rec_difference < 1e-4 * max(1.0, peer_decoded.abs().max().item()), rec_difference
    print(f"dictionary_learning {trainer} {settings}: max |ours - peer| codes {difference:.2e} "
          f"(of {expected.abs().max().item():.1f}), reconstructions {rec_difference:.2e}")


def test_resid_post_names_the_layer_and_the_model_needs_layer(service_store, tmp_path):
    store = ActivationStore(str(service_store / "store"))
    folder = train_run(tmp_path, list(tokens(store, 0, 4).split(256)), "TopKTrainer", k=8)
    extra = checkpoint.read_extra(str(folder))
    assert extra["layer"] == LAYER and extra["names"] == f"timm/vit_tiny_patch16_224 resid_post_layer_{LAYER}"
    assert extra["imported"]["format"] == "dictionary_learning" and extra["imported"]["dict_class"] == "AutoEncoderTopK"
    with pytest.raises(ConfigError, match="a model we cannot map to one of ours: pass --layer"):
        checkpoint.load_on_store(str(folder), store)
    sae, norm, spec = checkpoint.load_on_store(str(folder), store, layer=LAYER)
    assert spec.name == LAYER and norm is None and sae.cfg.k == 8
    for submodule, layer in (("resid_post_layer_9", 10), ("blocks.10.mlp", 10), (None, 10)):
        cfg = json.loads((folder / "config.json").read_text())
        cfg["trainer"].update(submodule_name=submodule, layer=layer)
        (folder / "config.json").write_text(json.dumps(cfg))
        assert "layer" not in checkpoint.read_extra(str(folder)), submodule


def write_like_training(folder: Path, trainer, state: dict | None = None) -> None:
    """What trainSAE writes into a trainer's folder: config.json, then ae.pt (the state dict)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"trainer": trainer.config}, indent=4))
    torch.save({k: v.cpu() for k, v in trainer.ae.state_dict().items()} if state is None else state,
               folder / "ae.pt")


def small_trainer(name: str, **settings):
    import dictionary_learning.trainers as trainers

    return getattr(trainers, name)(steps=10_000, activation_dim=16, dict_size=32, layer=3, lm_name="m",
                                   device="cpu", **settings)


def backup(trainer) -> dict:
    """Upstream training.py's resume backup (backup_steps), which stands in ae.pt until the run ends."""
    return {"step": 5, "ae": trainer.ae.state_dict(), "optimizer": trainer.optimizer.state_dict(),
            "config": trainer.config, "norm_factor": 3.0}


@pytest.mark.parametrize("trainer, settings, change, message", [
    ("GatedSAETrainer", {}, {}, "'GatedAutoEncoder' \\(gated: a gate and a magnitude path"),
    ("StandardTrainer", {}, {"config": {"dict_class": "AutoEncoderNew"}}, "a dictionary_learning 'AutoEncoderNew'"),
    ("StandardTrainer", {}, {"pickle": True}, "ae.pt: not plain weights, refused"),
    ("TopKTrainer", {"k": 4}, {"backup": True}, "the resume backup of a dictionary_learning run stopped at step 5"),
    ("TopKTrainer", {"k": 4}, {"config": {"dict_size": 64}},
     "the encoder is \\(32, 16\\).*config.json says \\(64, 16\\)"),
    ("TopKTrainer", {"k": 4}, {"config": {"k": 6}}, "ae.pt: k is 4, config.json says 6"),
    ("BatchTopKTrainer", {"k": 4}, {"drop": "threshold"}, "a BatchTopKSAE without its inference threshold"),
    ("JumpReluTrainer", {}, {"add": "W_skip"}, "tensors .*'W_skip'.*a dictionary_learning JumpReluAutoEncoder has"),
])
def test_what_we_cannot_represent_is_refused(tmp_path, trainer, settings, change, message):
    peer = small_trainer(trainer, **settings)
    state = {k: v.cpu() for k, v in peer.ae.state_dict().items()}
    state.pop(change.get("drop"), None)
    if "add" in change:
        state[change["add"]] = torch.zeros(16, 16)
    write_like_training(tmp_path / "run", peer, backup(peer) if change.get("backup") else state)
    if change.get("pickle"):  # an ae.pt holding the pickled module, not its weights
        torch.save(peer.ae, tmp_path / "run" / "ae.pt")
    if "config" in change:
        cfg = json.loads((tmp_path / "run" / "config.json").read_text())
        cfg["trainer"].update(change["config"])
        (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message) as e:
        checkpoint.load(str(tmp_path / "run"))
    assert "\n" not in str(e.value)


def test_other_files_are_not_claimed(tmp_path):
    from sae import SAEConfig, SparseAutoencoder
    from sae.imports import detect_format

    checkpoint.save(SparseAutoencoder(SAEConfig(d_in=16, d_sae=32, kind="relu")), str(tmp_path / "ours"))
    (tmp_path / "ours" / "config.json").write_text(json.dumps({"model": "x", "hookpoints": ["layers.1"]}))
    assert detect_format(str(tmp_path / "ours")) is None
    peer = small_trainer("StandardTrainer")
    write_like_training(tmp_path / "run", peer)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"dictionary": {"dict_size": 32}}))  # no "trainer"
    assert detect_format(str(tmp_path / "run")) is None
    with pytest.raises(ConfigError, match="no dictionary_learning SAE there"):
        checkpoint.load(f"dictionary_learning:{tmp_path / 'ours'}")
