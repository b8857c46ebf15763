"""The `actstore` command: one subcommand per stage.

Errors of the project's own family print as one line (`error: ...`) and exit
1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from actstore.errors import ActstoreError, ConfigError

Command = Callable[[argparse.Namespace], int]


def _storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    return json.loads(args.storage_options) if args.storage_options else None


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def store_summary(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What `actstore info` prints, as a dict."""
    from actstore.store import ActivationStore

    with ActivationStore(url, storage_options, allow_partial=True) as store:
        spec = store.spec
        stored, logical = store.nbytes_stored(), store.nbytes_logical()
        n_values = logical // spec.itemsize
        return {
            "url": store.url,
            "complete": store.complete,
            "units_done": len(store.units_done()),
            "n_units": spec.n_units,
            "backbone": spec.backbone,
            "dataset": spec.dataset,
            "n_images": spec.n_images,
            "n_rejected": store.attrs.get("summary", {}).get("n_rejected"),
            "layers": [{"name": l.name, "index": l.index, "shape": list(spec.shape(l.name)),
                        "tokens": l.tokens.to_dict()} for l in spec.layers],
            "dtype": spec.dtype,
            "codec": spec.codec,
            "images_per_chunk": spec.images_per_chunk,
            "images_per_shard": spec.images_per_shard,
            "bytes_stored": stored,
            "bytes_logical": logical,
            "compression_ratio": logical / stored if stored else None,
            "bytes_per_value": stored / n_values if n_values else None,
        }


def cmd_info(args: argparse.Namespace) -> int:
    s = store_summary(args.url, _storage_options(args))
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    bb = s["backbone"]
    seed = f", init seed {bb['init_seed']}" if bb.get("init_seed") is not None and not bb.get("checkpoint") else ""
    rejected = "" if s["n_rejected"] is None else f", {s['n_rejected']} rejected"
    print(f"store      {s['url']}")
    print(f"status     {'complete' if s['complete'] else 'INCOMPLETE'} ({s['units_done']}/{s['n_units']} units done)")
    print(f"backbone   {bb.get('family', '?')}:{bb.get('name', '?')}"
          f" ({bb.get('checkpoint') or 'random weights'}{seed})")
    print(f"dataset    {s['dataset'].get('source', '?')} ({s['n_images']} images{rejected})")
    for l in s["layers"]:
        t = l["tokens"]
        layout = ("CLS + " if t["cls"] else "") + f"{t['grid'][0]}x{t['grid'][1]} patches"
        if t["n_registers_dropped"]:
            layout += f", {t['n_registers_dropped']} registers dropped"
        block = f" (block {l['index']})" if l["index"] is not None else ""
        print(f"layer      {l['name']}{block}: {' x '.join(map(str, l['shape']))} [{layout}]")
    print(f"encoding   {s['dtype']}, {s['codec']}, {s['images_per_chunk']} images/chunk, "
          f"{s['images_per_shard']} images/shard")
    bpv = s["bytes_per_value"] or 0.0
    print(f"on disk    {_human(s['bytes_stored'])} ({bpv:.3f} bytes/value: {s['compression_ratio'] or 0:.2f}x "
          f"smaller than uncompressed {s['dtype']}, {bpv / 4:.2f}x the size of float32)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from actstore.store import verify_store

    report = verify_store(args.url, _storage_options(args), progress=not args.quiet)
    for problem in report.problems:
        print(f"BAD  {problem}")
    status = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    print(f"{status}: {report.units_checked}/{report.n_units} units, {report.chunks_checked} chunks, "
          f"{_human(report.bytes_checked)} checked in {report.url}")
    return 0 if report.ok else 1


def _layer_arg(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text


def cmd_extract(args: argparse.Namespace) -> int:
    from actstore.config import load_config
    from actstore.extract import ExtractConfig, run_extract

    overrides = {k: getattr(args, k) for k in ("images", "model", "out", "batch_size", "images_per_shard", "dtype",
                                               "codec", "pretrained", "init_seed", "max_pixels", "num_actors",
                                               "address", "max_units")}
    overrides["layers"] = tuple(args.layers) if args.layers else None
    overrides["storage_options"] = _storage_options(args)
    overrides["image_storage_options"] = json.loads(args.image_storage_options) if args.image_storage_options \
        else None
    overrides["overwrite"] = args.overwrite or None
    missing = [k for k in ("images", "model", "out") if overrides[k] is None]
    if missing and not args.config:
        raise ConfigError("extract needs " + ", ".join(f"--{m}" for m in missing) + " (or --config FILE.toml)")
    cfg = load_config(ExtractConfig, args.config, overrides)
    r = run_extract(cfg, progress=not args.quiet)
    state = "complete" if r.complete else f"partial ({r.units_skipped + r.units_written}/{r.units_total} units)"
    print(f"{r.url}: {state}; {r.units_written} units written ({r.images_written} images, {r.n_rejected} "
          f"rejected), {r.units_skipped} already done; {r.images_per_second:.1f} images/s over {r.seconds:.1f} s")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from actstore.config import load_config
    from sae.train import TrainConfig, train

    overrides: dict[str, Any] = {k: getattr(args, k) for k in ("store", "out", "layer", "tokens", "batch_size", "lr",
                                                               "seed", "num_workers", "log_every")}
    overrides["storage_options"] = _storage_options(args)
    if args.sae:
        fields: dict[str, Any] = {"kind": args.sae}
        for key in ("k", "expansion", "d_sae", "l1_coeff"):
            if getattr(args, key) is not None:
                fields[key] = getattr(args, key)
        overrides["sae"] = (fields,)
    missing = [k for k in ("store", "out") if overrides[k] is None]
    if missing and not args.config:
        raise ConfigError("train needs " + ", ".join(f"--{m}" for m in missing) + " (or --config FILE.toml)")
    cfg = load_config(TrainConfig, args.config, overrides)
    rows = train(cfg, progress=not args.quiet)
    for r in rows:
        print(f"{cfg.out}/{r['sae']}: step {r['step']}, {r['tokens']} tokens, fvu {r['fvu']:.4f}, "
              f"L0 {r['l0']:.1f}, dead {r['dead_fraction']:.1%}, dense {r['dense_fraction']:.1%}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from services.index import IndexConfig, build_index

    fields = {k: getattr(args, k) for k in ("layer", "k", "m", "per_band", "block_patches", "seed", "device")
              if getattr(args, k) is not None}
    cfg = IndexConfig(store=args.store, sae=args.sae, out=args.out, overwrite=args.overwrite,
                      storage_options=_storage_options(args) or {}, **fields)
    out = build_index(cfg, progress=not args.quiet)
    print(f"{out}: index written; serve it with\n  actstore serve --index {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from services import api

    if args.ray:
        import ray

        ray.init(address=args.address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        print(f"serving {args.index} through Ray Serve at http://{args.host}:{args.port}/ (Ctrl-C stops)")
        api.run_ray(args.index, args.host, args.port, args.token, _storage_options(args), replicas=args.replicas)
    else:
        api.read_index_meta(args.index)  # a bad index fails here, as one line, before uvicorn starts
        print(f"serving {args.index} at http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
        api.run(args.index, args.host, args.port, args.token, _storage_options(args), workers=args.workers)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Images -> store -> small SAE -> feature index, then the command that opens the browser."""
    from actstore.extract import ExtractConfig, run_extract
    from actstore.shapes import generate_dataset
    from actstore.store._io import filesystem
    from sae.train import TrainConfig, train
    from services.index import IndexConfig, build_index

    fs, root = filesystem(args.images, None)
    if not fs.exists(f"{root}/factors.parquet"):
        print(f"[1/4] generating {args.n_images} shape images in {args.images}")
        generate_dataset(args.images, args.n_images, seed=args.seed, overwrite=True)
    cfg = ExtractConfig(images=args.images, model=args.model, out=args.store, init_seed=args.seed,
                        images_per_shard=64, batch_size=32)
    print(f"[2/4] extracting {args.model} (random weights), layer -2 -> {args.store}")
    r = run_extract(cfg)
    print(f"extracted {r.images_written} images ({r.units_skipped} units already done) in {r.seconds:.1f} s\n")
    cmd_info(argparse.Namespace(url=args.store, storage_options=None, json=False))
    print(f"\n[3/4] training a TopK SAE (x8, k=32) on {args.tokens} patches -> {args.sae_out}")
    rows = train(TrainConfig(store=args.store, out=args.sae_out, sae=({"name": "topk", "kind": "topk",
                                                                     "expansion": 8, "k": 32},),
                             tokens=args.tokens, batch_size=2048, seed=args.seed, log_every=25))
    print(f"fvu {rows[-1]['fvu']:.3f}, L0 {rows[-1]['l0']:.1f}, dead {rows[-1]['dead_fraction']:.1%}")
    print(f"\n[4/4] indexing every patch -> {args.index}")
    out = build_index(IndexConfig(store=args.store, sae=f"{args.sae_out}/topk", out=args.index, overwrite=True))
    print(f"\ndone. Browse the features:\n  .venv/bin/actstore serve --index {out}\n"
          "then open http://127.0.0.1:8000/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="actstore", description="Activation stores for vision SAEs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Command, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    def add_url(p: argparse.ArgumentParser) -> None:
        p.add_argument("url", help="store URL: a path, file://..., or s3://bucket/prefix")
        p.add_argument("--storage-options", metavar="JSON", help='fsspec options, e.g. \'{"anon": true}\'')

    p = add("info", cmd_info, "Describe a store: model, layers, shape, dtype, size on disk, completeness.")
    add_url(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p = add("verify", cmd_verify, "Read every chunk, check checksums and unit records; exit 1 naming bad objects.")
    add_url(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p = add("extract", cmd_extract, "Run a backbone over an image dataset and write an activation store (Ray).")
    p.add_argument("--images", help="image folder (class subfolders = labels) or .txt/.csv/.parquet list; "
                                     "local or s3://")
    p.add_argument("--model", help="open_clip:<arch> or timm:<arch>, e.g. timm:vit_small_patch14_reg4_dinov2")
    p.add_argument("--out", help="store URL")
    p.add_argument("--layers", nargs="+", type=_layer_arg, metavar="L",
                   help="block indices (negative from the end) or names; default -2")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default 64)")
    p.add_argument("--images-per-shard", type=int, help="images per work unit / shard (default 256)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="stored dtype (default bfloat16)")
    p.add_argument("--codec", choices=["blosc-lz4", "zstd", "none"], help="chunk codec (default blosc-lz4)")
    p.add_argument("--pretrained", metavar="TAG|PATH", help="hub tag or local checkpoint; default random weights")
    p.add_argument("--init-seed", type=int, help="seed of random weights (default 0)")
    p.add_argument("--max-pixels", type=int, help="reject larger images as decompression bombs")
    p.add_argument("--num-actors", type=int, help="forward actors (default: one per GPU, one on CPU)")
    p.add_argument("--address", help="Ray cluster address (default RAY_ADDRESS, else local Ray)")
    p.add_argument("--storage-options", metavar="JSON", help="fsspec options for --out")
    p.add_argument("--image-storage-options", metavar="JSON", help="fsspec options for --images")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store with a different spec")
    p.add_argument("--max-units", type=int, help="stop after N units (rerun to resume)")
    p.add_argument("--config", metavar="FILE.toml", help="options from a TOML file; flags override it")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p = add("train", cmd_train, "Train one SAE, or a sweep of SAEs on the same batches, on a store's patches.")
    p.add_argument("--store", help="activation store URL")
    p.add_argument("--out", help="output directory (SAEs, metrics.jsonl, checkpoint/); rerun to resume")
    p.add_argument("--layer", type=_layer_arg, help="store layer (default -2)")
    p.add_argument("--sae", choices=["topk", "batchtopk", "relu", "jumprelu"], help="SAE kind (default topk)")
    p.add_argument("--k", type=int, help="active latents (topk kinds, default 32)")
    p.add_argument("--expansion", type=float, help="d_sae / d_in (default 16)")
    p.add_argument("--d-sae", type=int, help="number of latents (instead of --expansion)")
    p.add_argument("--l1-coeff", type=float, help="relu: L1 coefficient")
    p.add_argument("--tokens", type=int, help="training tokens (default 10M)")
    p.add_argument("--batch-size", type=int, help="patches per step (default 4096)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 2e-4)")
    p.add_argument("--seed", type=int, help="loader order and resampling seed")
    p.add_argument("--num-workers", type=int, help="data-parallel Ray Train workers (default 1)")
    p.add_argument("--log-every", type=int, help="steps between metric lines (default 50)")
    p.add_argument("--storage-options", metavar="JSON", help="fsspec options for --store and --out")
    p.add_argument("--config", metavar="FILE.toml", help="options (and a [[sae]] sweep) from TOML; flags override")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p = add("index", cmd_index, "Index an SAE's features over every patch of a store (top images, densities).")
    p.add_argument("--store", required=True, help="activation store URL")
    p.add_argument("--sae", required=True, help="SAE checkpoint directory (sae.safetensors + cfg.json)")
    p.add_argument("--out", required=True, help="local index folder")
    p.add_argument("--layer", type=_layer_arg, help="store layer (default: the SAE's)")
    p.add_argument("--k", type=int, help="top images per feature (default 32)")
    p.add_argument("--m", type=int, help="top features per image (default 16)")
    p.add_argument("--per-band", type=int, help="random examples per activation octave (default 4)")
    p.add_argument("--block-patches", type=int, help="patches encoded at once (default 32768)")
    p.add_argument("--seed", type=int, help="seed of the band samples (default 0)")
    p.add_argument("--device", help="where the SAE encodes (default cpu), e.g. cuda")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index")
    p.add_argument("--storage-options", metavar="JSON", help="fsspec options for --store and --sae")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p = add("serve", cmd_serve, "Serve a feature index over HTTP: the JSON API and the feature browser.")
    p.add_argument("--index", required=True, help="index folder (from `actstore index`)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' (default $ACTSTORE_TOKEN, else none)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="uvicorn worker processes (default 2, 1 on a single core): with one, a burst of "
                        "clients queues behind a single event loop (see benchmarks/bench_service.py)")
    p.add_argument("--ray", action="store_true", help="serve through Ray Serve instead of plain uvicorn")
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas")
    p.add_argument("--address", help="Ray cluster address (default RAY_ADDRESS, else a local Ray)")
    p.add_argument("--storage-options", metavar="JSON", help="fsspec options for reading the dataset's images")
    p = add("demo", cmd_demo, "Images -> store -> small SAE -> feature index; prints the serve command.")
    p.add_argument("--images", default="./data/demo-images", help="where the images go (default ./data/demo-images)")
    p.add_argument("--store", default="./stores/demo", help="store URL (default ./stores/demo)")
    p.add_argument("--sae-out", default="./stores/demo-sae", help="trainer output (default ./stores/demo-sae)")
    p.add_argument("--index", default="./stores/demo-index", help="index folder (default ./stores/demo-index)")
    p.add_argument("--model", default="timm:vit_small_patch16_224", help="backbone (random weights)")
    p.add_argument("--n-images", type=int, default=256)
    p.add_argument("--tokens", type=int, default=200_000, help="SAE training patches (default 200k)")
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except ActstoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except json.JSONDecodeError as e:
        print(f"error: --storage-options is not valid JSON ({e})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
