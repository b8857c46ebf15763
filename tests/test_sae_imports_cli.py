"""The CLI stages on SAEs of other libraries: index (with --layer: their models are not ours), compare, evaluate, steer.

Each SAE is written by its library's own code (or byte for byte as its loader reads it, as in its reader's tests).
Compare checks what index and compare read: the imported SAE's index against the same SAE saved as ours (its
weights and normalization as `--sae` reads them) matches every live feature with itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from actstore.store import ActivationStore
from sae import checkpoint
from services.compare import read_comparison, read_table
from test_sae_imports import saelens_sae
from test_sae_imports_dictionary_learning import train_run
from test_sae_imports_overcomplete import peer_sae
from test_sae_imports_prisma import PrismaStandardSAE, prisma_config, write_prisma
from test_sae_imports_saev import random_state, write_sae_pt
from test_sae_imports_sparsify import sparsify_sae

LAYER = "10"


def write(fmt: str, folder: Path, store: ActivationStore) -> str:
    """An SAE of library `fmt` at `folder`, as that library saves it; the `--sae` that names it."""
    d = store.layer(LAYER).d
    x = store.read(LAYER, 0, 4)[:, 1:].reshape(-1, d).float()
    if fmt == "dictionary_learning":
        return f"{fmt}:{train_run(folder, [x], 'TopKTrainer', k=4, threshold_start_step=0)}"
    if fmt == "overcomplete":
        folder.mkdir()
        torch.save(peer_sae("topk", d, x), folder / "topk_sae.pt")
        return f"{fmt}:{folder / 'topk_sae.pt'}"
    if fmt == "saelens":
        saelens_sae("topk", d, d_sae=64, k=4, metadata={"model_name": "vit-tiny"}).save_model(str(folder))
    elif fmt == "saev":  # saev 0.1's schema-less header: its normalization is rebuilt from the store
        write_sae_pt(folder / "sae.pt", {"d_vit": d, "exp_factor": 1, "lib": "0.1.0"}, random_state(d, seed=5))
    elif fmt == "prisma":
        write_prisma(folder, prisma_config(d, expansion_factor=1), PrismaStandardSAE(d, d, 7, torch.zeros(d)))
    elif fmt == "sparsify":
        sparsify_sae(d, num_latents=64, k=4).save_to_disk(folder)
    return f"{fmt}:{folder}"


@pytest.mark.parametrize("fmt", ["dictionary_learning", "overcomplete", "prisma", "saelens", "saev", "sparsify"])
def test_index_compare_evaluate_run_on_an_imported_sae(service_store, tmp_path, capsys, fmt):
    from actstore_cli import main

    store_url, images = str(service_store / "store"), str(service_store / "images")
    store = ActivationStore(store_url)
    sae = write(fmt, tmp_path / fmt, store)
    assert main(["index", "--store", store_url, "--sae", sae, "--out", str(tmp_path / "index"), "--layer", LAYER,
                 "--k", "4", "-q"]) == 0
    assert json.loads((tmp_path / "index" / "index.json").read_text())["sae"] == sae

    model, norm, _ = checkpoint.load_on_store(sae, store, LAYER)
    checkpoint.save(model, str(tmp_path / "twin"), norm, extra=checkpoint.origin(store, LAYER))
    assert main(["compare", "--a", str(tmp_path / "index"), "--b", f"{tmp_path / 'twin'}@{store_url}",
                 "--out", str(tmp_path / "cmp"), "-q"]) == 0
    summary = read_comparison(tmp_path / "cmp")
    assert summary["a"]["sae"] == sae and summary["a"]["layer"] == LAYER
    matches = read_table(tmp_path / "cmp", "matches_a.parquet").to_pandas()
    live = matches[np.isfinite(matches.pearson)]
    assert len(live) > 0 and (live.pearson > 0.999).all()  # every feature has a perfect twin: itself, but for ties
    assert (live.best_b == live.feature_a).mean() > 0.9

    out = tmp_path / "eval.json"
    assert main(["evaluate", "--sae", sae, "--store", store_url, "--layer", LAYER, "--images", images,
                 "--max-images", "8", "--batch-size", "8", "--json", str(out), "-q"]) == 0
    result = json.loads(out.read_text())
    assert result["n_images"] == 8 and result["layer"] == LAYER
    assert all(np.isfinite(v) for v in result["kl"].values())
    assert main(["evaluate", "--sae", sae, "--store", store_url, "--images", images, "--json",
                 str(tmp_path / "e2.json"), "-q"]) == 1  # without --layer, evaluate says what is missing
    assert "pass --layer" in capsys.readouterr().err and not (tmp_path / "e2.json").exists()

    steered = tmp_path / "steer.json"
    assert main(["steer", "--sae", sae, "--store", store_url, "--layer", LAYER, "--image", "2", "--edit",
                 "3:add:40@all", "--json", str(steered)]) == 0
    result = json.loads(steered.read_text())
    assert result["edits"] == ["3:add:40@all"] and result["before"] != result["after"]


def test_serving_steering_checks_an_imported_sae_on_its_index_layer(service_store, tmp_path):
    from actstore.errors import ConfigError
    from services.api.steering import served_heads

    store_url = str(service_store / "store")
    sae = write("saev", tmp_path / "saev", ActivationStore(store_url))
    assert served_heads(sae, store_url, ["model"], {}, LAYER) == {"model": "model"}  # the index's layer
    with pytest.raises(ConfigError, match="pass --layer"):
        served_heads(sae, store_url, ["model"], {})
