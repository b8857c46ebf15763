"""Explain: features/s of each path of `actstore explain`, each against its model called alone in the same run.

Data (services.steer.setup): generated shapes through a random-weight open_clip ViT-S/32 (layer 10), a TopK SAE
(d_sae 512, k 8) and its index (k 8). Paths, each on the N densest features (explanations.parquet rewritten each
time, --overwrite):

    vocabulary   the store's text tower names every feature (class names + built-in concepts), embedding AUROC
    endpoint     an OpenAI-compatible server (actstore.testing.chat, a thread in this process that reads the images
                 with numpy) explains and judges, 8 requests in flight; embedding AUROC too
    local VLM    a tiny random LLaVA (actstore.testing.tiny_vlm) through hf:, one prompt at a time; embedding AUROC

Each path runs the whole command twice, on the densest feature and on the N densest: the first is its fixed cost
(models opened and checked, the pool of silent images encoded, the table written), the difference what each further
feature costs. The reference, per feature: vocabulary, embedding the 18 images a feature needs (6 top, 12 held out)
at the rate one pass over the store's images runs (decode, backbone, projection); endpoint and local VLM, the same
calls with the same prompts (top images highlighted, held-out ones plain) sent straight to the backend, at the same
concurrency.

Run: .venv/bin/python benchmarks/bench_explain.py [--quick] [--json out.json] [--workdir DIR]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from actstore.extract.backbones import BackboneConfig, load_backbone
from actstore.extract.zeroshot import text_tower
from actstore.store import ActivationStore
from actstore.testing.chat import ChatServer
from actstore.testing.shapes import generate_dataset
from actstore.testing.tiny_vlm import write_tiny_llava
from services.api.reader import IndexReader
from services.explain import ExplainConfig, read_explanations, run_explain
from services.explain.backends import open_backend
from services.explain.prompts import explain_prompt, highlighted, judge_prompt
from services.spliced import decode_images
from services.steer.setup import build_steering
from _common import Parser, Run, log, machine, print_notes, print_table  # benchmarks/ is sys.path[0]


def timed_explain(cfg: ExplainConfig, n: int) -> tuple[float, float, list[dict[str, Any]]]:
    """(seconds for 1 feature: the fixed part, seconds for the n densest, the rows of the n)."""
    times = []
    for features in (1, n):
        t0 = time.perf_counter()
        run_explain(replace(cfg, features=f"densest:{features}"), progress=False, say=lambda _: None)
        times.append(time.perf_counter() - t0)
    return times[0], times[1], read_explanations(cfg.index).to_pylist()


def embed_images_per_s(store_url: str) -> float:
    """Images embedded per second (decode, preprocess, backbone, projection), over every image of the store once."""
    store = ActivationStore(store_url)
    meta = store.attrs["backbone"]
    cfg = BackboneConfig(f"{meta['family']}:{meta['name']}", layers=("10",), init_seed=int(meta["init_seed"]))
    backbone, tower = load_backbone(cfg), text_tower(cfg)
    uris = store.images().column("uri").to_pylist()
    t0 = time.perf_counter()
    for s in range(0, len(uris), 32):
        pixels, _ = decode_images(backbone, uris[s:s + 32])
        with torch.no_grad():
            tower.images(backbone.outputs(pixels)[0])
    return len(uris) / (time.perf_counter() - t0)


def direct_calls_s(index: str, rows: list[dict[str, Any]], spec: str, **options: Any) -> tuple[float, int]:
    """Seconds for the same explain and judge calls as `rows` sent straight to the backend, and their number."""
    reader = IndexReader(index)
    size = options.pop("image_size")
    grid = tuple(reader.meta["grid"])
    explains, judges = [], []
    for r in rows:
        top = [int(i) for i in reader.array("top_images")[r["feature"]][:6] if i >= 0]
        heat = reader.array("heatmaps")[r["feature"], :len(top)].astype("float32")
        explains.append(explain_prompt([highlighted(reader.thumbnail(i, size), h, grid) for i, h in zip(top, heat)],
                                       [reader.thumbnail(i, size) for i in r["shown"][len(top):]]))
        held = [i for i in range(reader.n_images) if i not in r["shown"]][:r["detection_n"]]
        judges += [judge_prompt(reader.thumbnail(i, size), r["explanation"]) for i in held]
    backend = open_backend(spec, **options)
    t0 = time.perf_counter()
    list(backend.ask(explains))
    list(backend.judge(judges))
    elapsed = time.perf_counter() - t0
    backend.close()
    return elapsed, len(explains) + len(judges)


def main() -> None:
    parser = Parser(__doc__, "96 images, 8 features (4 for the local VLM)")
    parser.add_argument("--workdir", help="build the setup here (default: a temporary folder)")
    args = parser.parse()
    n_images, n_features, n_local = (96, 8, 4) if args.quick else (192, 32, 8)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp) / "explain-bench"
        if root.exists():
            shutil.rmtree(root)
        log(f"building the shapes setup ({n_images} images) in {root}")
        generate_dataset(str(root / "images"), n_images, seed=5, image_size=64, masks=str(root / "masks"))
        setup = build_steering(root, str(root / "images"), str(root / "masks"))
        vlm = write_tiny_llava(str(root / "vlm"))
        run = Run("bench_explain", args)
        index = str(setup.index)
        common = {"index": index, "overwrite": True, "n_held_out": 6}
        table = []
        log("vocabulary")
        one, t, rows = timed_explain(ExplainConfig(**common), n_features)
        per_feature = (6 + 2 * 6) / embed_images_per_s(setup.store)  # its top images and held-out ones, embedded
        table.append({"path": "vocabulary (open_clip ViT-S/32)", "features": len(rows), "setup_s": one, "s": t,
                      "ref": "embedding its 18 images", "ref_feature_s": per_feature})
        with ChatServer() as server:
            log("endpoint")
            one, t, rows = timed_explain(ExplainConfig(explainer="openai:shapes-vlm", endpoint=server.url,
                                                       vocabulary_names=False, **common), n_features)
            ref, calls = direct_calls_s(index, rows, "openai:shapes-vlm", endpoint=server.url, concurrency=8,
                                        image_size=224)
            table.append({"path": "endpoint (chat server, 8 in flight)", "features": len(rows), "setup_s": one,
                          "s": t, "ref": f"its {calls // len(rows)} calls alone", "ref_feature_s": ref / len(rows)})
        log("local VLM")
        one, t, rows = timed_explain(ExplainConfig(explainer=f"hf:{vlm}", vocabulary_names=False, image_size=64,
                                                   **common), n_local)
        ref, calls = direct_calls_s(index, rows, f"hf:{vlm}", image_size=64)
        table.append({"path": "local VLM (tiny LLaVA, hf:)", "features": len(rows), "setup_s": one, "s": t,
                      "ref": f"its {calls // len(rows)} calls alone", "ref_feature_s": ref / len(rows)})
        run.stop()
    for row in table:
        row["features_per_s"] = (row["features"] - 1) / (row["s"] - row["setup_s"])
        row["ratio"] = 1 / row["features_per_s"] / row["ref_feature_s"]
    print(f"Explain: {n_images} shapes, open_clip ViT-S/32 (random weights), TopK SAE d_sae 512 k 8 on layer 10")
    print_table([("path", "path", "{}"), ("features", "features", "{}"), ("1 feature s", "setup_s", "{:.1f}"),
                 ("all s", "s", "{:.1f}"), ("features/s", "features_per_s", "{:.2f}"), ("reference", "ref", "{}"),
                 ("ref s/feature", "ref_feature_s", "{:.3f}"), ("s/feature vs ref", "ratio", "{:.2f}x")], table, 1)
    print_notes(["1 feature s: the whole command on one feature (models opened and checked, the pool of 512 "
                 "silent-image candidates encoded, the table written); features/s: (features - 1) / (all s - 1 "
                 "feature s), what each further feature costs (explanation, judgements, embedding AUROC)",
                 "6 held-out activating + 6 silent images per explanation; the chat server shares this machine's "
                 "cores", "throughput on a real VLM is the endpoint's: the run adds the prompts' images and scoring"])
    run.finish({"rows": table, "machine": machine()})


if __name__ == "__main__":
    main()
