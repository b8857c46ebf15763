"""ViT-Prisma SAEs read as ours: our codes equal Prisma's encode of the same tokens.

The registry's vit-prisma (0.1.2, 0.1.4) has no sae module, so the files are written byte for byte as Prisma's
current loader reads them (src/vit_prisma/sae/sae.py `load_from_pretrained` and sae/config.py `load_config` at
Prisma-Multimodal/ViT-Prisma aa5ff6ad): config.json as `VisionModelSAERunnerConfig.save_config` writes it (every
field, json indent 4) and `torch.save` of a StandardSparseAutoencoder's `state_dict()`. `prisma_encode` is a plain
transcription of that sae.py's StandardSparseAutoencoder.encode, TopK and get_activation_fn. Prisma has no switch
for subtracting b_dec (its encode always does), so there is no fold to test.
"""

from __future__ import annotations

import gzip
import json
import math
import pickle
from pathlib import Path

import einops
import pytest
import torch
from torch import nn

from actstore.errors import ConfigError
from actstore.store import ActivationStore
from sae import checkpoint
from sae.imports import FORMATS, detect_format, read_imported

LAYER = "10"
EXPANSION = 4


def prisma_config(d_in: int, **over) -> dict:
    """VisionModelSAERunnerConfig's fields in declaration order (aa5ff6ad), as save_config's asdict writes them."""
    cfg = {
        "model_class_name": "HookedViT", "model_name": "open-clip:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K",
        "vit_model_cfg": None, "model_path": None, "hook_point_layer": int(LAYER), "layer_subtype": "hook_resid_post",
        "hook_point_head_index": None, "context_size": 50, "use_cached_activations": False, "use_patches_only": False,
        "cached_activations_path": "activations/imagenet/open-clip:laion_CLIP/blocks.10.hook_resid_post",
        "image_size": 224, "architecture": "standard", "b_dec_init_method": "geometric_median",
        "expansion_factor": EXPANSION, "from_pretrained_path": None, "is_transcoder": False,
        "transcoder_with_skip_connection": True, "out_hook_point_layer": 9, "layer_out_subtype": "hook_mlp_out",
        "d_out": 768, "_device": "cuda", "seed": 42, "_dtype": "float32", "d_in": d_in, "activation_fn_str": "relu",
        "activation_fn_kwargs": {}, "cls_token_only": False, "max_grad_norm": 1.0,
        "initialization_method": "independent", "normalize_activations": "none", "n_batches_in_buffer": 20,
        "store_batch_size": 32, "num_workers": 16, "num_epochs": 1, "verbose": False, "l1_coefficient": 0.0002,
        "lp_norm": 1, "lr": 0.001, "lr_scheduler_name": "cosineannealingwarmup", "lr_warm_up_steps": 500,
        "train_batch_size": 4096, "dataset_name": "imagenet", "dataset_path": "imagenet",
        "dataset_train_path": "imagenet/train", "dataset_val_path": "imagenet/val", "use_ghost_grads": False,
        "feature_sampling_window": 1000, "dead_feature_window": 5000, "dead_feature_threshold": 1e-08,
        "log_to_wandb": True, "wandb_project": "prisma", "wandb_entity": None, "wandb_log_frequency": 10,
        "n_validation_runs": 0, "n_checkpoints": 10, "checkpoint_path": "checkpoints",
    }
    cfg.update(over)
    return cfg


class PrismaStandardSAE(nn.Module):
    """A StandardSparseAutoencoder's state: its parameters in initialize_sae_weights' order, its four HookPoints."""

    def __init__(self, d_in: int, d_sae: int, seed: int, b_dec: torch.Tensor) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_dec = nn.Parameter(torch.randn(d_sae, d_in, generator=g) / math.sqrt(d_in))
        self.W_enc = nn.Parameter(torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in))
        self.b_enc = nn.Parameter(torch.randn(d_sae, generator=g) * 0.3)
        self.b_dec = nn.Parameter(b_dec + torch.randn(d_in, generator=g) * 0.3)
        for hook in ("hook_sae_in", "hook_hidden_pre", "hook_hidden_post", "hook_sae_out"):
            setattr(self, hook, nn.Identity())


def write_prisma(folder: Path, cfg: dict, sae: PrismaStandardSAE | None = None, weights: str = "weights.pt",
                 payload=None) -> None:
    """config.json as save_config writes it and the weights as torch.save(sae.state_dict()) (or `payload`)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "config.json", "w") as f:
        json.dump(cfg, f, indent=4)
    torch.save(sae.state_dict() if payload is None else payload, folder / weights)


def prisma_encode(state: dict[str, torch.Tensor], cfg: dict, x: torch.Tensor) -> torch.Tensor:
    """Prisma's StandardSparseAutoencoder.encode (normalize_activations "none"), feature_acts, float32."""
    x = x.to(torch.float32)
    sae_in = x - state["b_dec"]  # Remove decoder bias as per Anthropic
    hidden_pre = einops.einsum(sae_in, state["W_enc"], "... d_in, d_in d_sae -> ... d_sae") + state["b_enc"]
    if cfg["activation_fn_str"] == "relu":
        return torch.nn.ReLU()(hidden_pre)
    topk = torch.topk(hidden_pre, k=cfg["activation_fn_kwargs"]["k"], dim=-1)  # TopK.forward, postact_fn ReLU
    values = torch.nn.ReLU()(topk.values)
    result = torch.zeros_like(hidden_pre)
    result.scatter_(-1, topk.indices, values)
    return result


def tokens(store: ActivationStore, n: int = 6) -> torch.Tensor:
    """CLS and patch tokens of n images (Prisma's default SAEs train on all of them)."""
    return store.read(LAYER, 0, n).reshape(-1, store.layer(LAYER).d).float()


def dense(acts) -> torch.Tensor:
    return acts.to_dense() if hasattr(acts, "to_dense") else acts


@pytest.mark.parametrize("activation, k", [("relu", None), ("topk", 8), ("topk", 500)])
def test_prisma_codes_equal_prisma_encode(service_store, tmp_path, activation, k):
    store = ActivationStore(str(service_store / "store"))
    d = store.layer(LAYER).d
    x = tokens(store)
    cfg = prisma_config(d, activation_fn_str=activation, activation_fn_kwargs={"k": k} if k else {})
    peer = PrismaStandardSAE(d, d * EXPANSION, seed=len(activation) + (k or 0), b_dec=x.mean(0))
    write_prisma(tmp_path / "run", cfg, peer)
    with torch.no_grad():
        expected = prisma_encode(peer.state_dict(), cfg, x)
    if k == 500:  # Prisma ReLUs the selected values: some tokens have fewer than k positive pre-activations
        assert ((expected > 0).sum(-1) < k).any()
    assert detect_format(str(tmp_path / "run")) == "prisma" == detect_format(str(tmp_path / "run" / "weights.pt"))
    sae, norm = checkpoint.load(f"prisma:{tmp_path / 'run'}")
    found, _ = checkpoint.load(str(tmp_path / "run" / "weights.pt"))
    assert norm is None and sae.cfg.kind == activation and sae.cfg.d_sae == d * EXPANSION
    with torch.no_grad():
        ours = dense(sae.encode(x))
        assert torch.equal(ours, dense(found.encode(x)))
    assert ((ours > 0) == (expected > 0)).float().mean() > 0.999
    difference = (ours - expected).abs().max().item()
    assert difference < 1e-5 * max(1.0, expected.abs().max().item()), difference
    print(f"prisma {activation} k={k}: max |ours - prisma| = {difference:.2e} (float32, {x.shape[0]} tokens)")

    extra = checkpoint.read_extra(f"prisma:{tmp_path / 'run'}")
    assert extra["layer"] == LAYER and extra["tokens"] == "all" and "backbone" not in extra
    assert extra["names"] == "open-clip:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K blocks.10.hook_resid_post"
    assert extra["imported"] == {"format": "prisma", "version": None, "activation": activation, "k": k}
    with pytest.raises(ConfigError, match="pass --layer"):  # the model is named, not mapped
        checkpoint.load_on_store(str(tmp_path / "run"), store)
    _, store_norm, spec = checkpoint.load_on_store(str(tmp_path / "run"), store, layer=LAYER)
    assert spec.name == LAYER and store_norm is None  # Prisma trains on the hook's raw activations


def test_trainer_folder_and_a_config_written_before_layer_subtype(tmp_path):
    """The trainer's folder (n_images_N.pt beside its log_feature_sparsity.pt) is read from its only SAE file; a
    config that records `hook_point` instead of layer_subtype names its layer by it, cls_token_only its tokens."""
    d = 16
    cfg = prisma_config(d, hook_point="blocks.3.hook_resid_post", hook_point_layer=3, cls_token_only=True)
    del cfg["layer_subtype"]
    peer = PrismaStandardSAE(d, d * EXPANSION, seed=1, b_dec=torch.zeros(d))
    write_prisma(tmp_path, cfg, peer, weights="n_images_130007.pt")
    torch.save(torch.zeros(d * EXPANSION), tmp_path / "n_images_130007_log_feature_sparsity.pt")
    sae, _ = checkpoint.load(f"prisma:{tmp_path}")
    x = torch.randn(5, d)
    with torch.no_grad():
        assert (dense(sae.encode(x)) - prisma_encode(peer.state_dict(), cfg, x)).abs().max() < 1e-5
    extra = checkpoint.read_extra(str(tmp_path))
    assert extra["layer"] == "3" and extra["tokens"] == "cls"
    torch.save(peer.state_dict(), tmp_path / "n_images_260014.pt")
    with pytest.raises(ConfigError, match="several .pt: n_images_130007.pt, n_images_260014.pt; name one"):
        checkpoint.load(f"prisma:{tmp_path}")
    assert checkpoint.load(f"prisma:{tmp_path / 'n_images_260014.pt'}")[0].cfg.d_sae == d * EXPANSION


class NotWeights:
    """Any class, as Prisma's save_model pickles its VisionModelSAERunnerConfig: not plain weights."""


@pytest.mark.parametrize("change, message", [
    ({"activation_fn_str": "tanh-relu"}, "activation_fn_str 'tanh-relu'; we read relu and topk"),
    ({"architecture": "gated"}, "a Prisma 'gated' SAE"),
    ({"is_transcoder": True}, "a Prisma transcoder"),
    ({"activation_fn_str": "topk"}, "activation_fn_kwargs {}"),
    ({"normalize_activations": "layer_norm"}, "'layer_norm' transforms each token on its own"),
    ({"normalize_activations": "constant_norm_rescale"}, "'constant_norm_rescale' transforms each token"),
    ({"normalize_activations": None, "drop": "normalize_activations"}, "'layer_norm' \\(its default"),
    ({"normalize_activations": "expected_average_only_in"}, "not one this reader knows"),
    ({"_dtype": "float16"}, "_dtype 'float16'"),
    ({"hook_point_head_index": 2}, "head 2 of its hook"),
    ({"layer_subtype": "hook_mlp_out"}, "of blocks.10.hook_mlp_out, not a block's output"),
    ({"layer_subtype": "hook_resid_pre"}, "of blocks.10.hook_resid_pre, not a block's output"),
    ({"hook_point": "blocks.9.hook_resid_post"}, "says hook_point 'blocks.9.hook_resid_post' but"),
    ({"expansion_factor": 2}, "W_enc is \\(16, 64\\); config.json"),
    ({"payload": "save_model"}, "weights.pt is not plain weights, refused"),
    ({"payload": "extra"}, "holds \\['W_dec', 'W_enc', 'b_dec', 'b_enc', 'step'\\]"),
    ({"weights": "weights.pkl.gz"}, "weights.pkl.gz is not a .pt; Prisma's .pkl and .pkl.gz are plain pickles"),
])
def test_what_we_cannot_read_is_refused(tmp_path, change, message):
    d = 16
    change = dict(change)
    payload, weights, drop = change.pop("payload", None), change.pop("weights", None), change.pop("drop", None)
    cfg = prisma_config(d, **change)
    if drop:
        del cfg[drop]
    peer = PrismaStandardSAE(d, d * EXPANSION, seed=0, b_dec=torch.zeros(d))
    if payload == "save_model":  # sae.py save_model: {"cfg": self.cfg, "state_dict": self.state_dict()}
        payload = {"cfg": NotWeights(), "state_dict": peer.state_dict()}
    elif payload == "extra":
        payload = {**peer.state_dict(), "step": torch.tensor(3)}
    if weights:  # Prisma's gzip'd pickle of save_model's dict
        (tmp_path / "config.json").write_text(json.dumps(cfg, indent=4))
        with gzip.open(tmp_path / weights, "wb") as f:
            pickle.dump({"state_dict": peer.state_dict()}, f)
    else:
        write_prisma(tmp_path, cfg, peer, payload=payload)
    assert detect_format(str(tmp_path)) == "prisma"
    with pytest.raises(ConfigError, match=message) as e:
        checkpoint.load(f"prisma:{tmp_path}")
    assert "\n" not in str(e.value)


def test_only_prisma_folders_are_claimed(tmp_path):
    """A model's config.json is not Prisma's, and no other reader takes a Prisma folder."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 192}))
    torch.save({}, tmp_path / "hf" / "weights.pt")
    assert detect_format(str(tmp_path / "hf")) is None
    write_prisma(tmp_path / "run", prisma_config(16), PrismaStandardSAE(16, 64, seed=0, b_dec=torch.zeros(16)))
    for fmt in FORMATS:
        if fmt != "prisma":
            with pytest.raises(ConfigError, match=f"no {fmt} SAE there"):
                read_imported(str(tmp_path / "run"), fmt)
