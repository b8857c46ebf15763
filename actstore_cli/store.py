"""`actstore info` and `actstore verify`: what a store holds, and whether every byte is intact."""

from __future__ import annotations

import argparse
import json
from typing import Any

from actstore_cli.args import Command, add_command, add_quiet, json_object


def human(n: float) -> str:
    """Bytes in decimal units."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def print_info(url: str, storage_options: dict[str, Any] | None = None, as_json: bool = False) -> None:
    from actstore.store import store_summary

    s = store_summary(url, storage_options)
    if as_json:
        print(json.dumps(s, indent=2))
        return
    bb = s["backbone"]
    seed = f", init seed {bb['init_seed']}" if bb.get("init_seed") is not None and not bb.get("checkpoint") else ""
    rejected = "" if s["n_rejected"] is None else f", {s['n_rejected']} rejected"
    print(f"store      {s['url']}")
    print(f"status     {'complete' if s['complete'] else 'INCOMPLETE'} ({s['units_done']}/{s['n_units']} units done)")
    print(f"backbone   {bb.get('family', '?')}:{bb.get('name', '?')}"
          f" ({bb.get('checkpoint') or 'random weights'}{seed})")
    print(f"dataset    {s['dataset'].get('source', '?')} ({s['n_images']} images{rejected})")
    names, columns = s["dataset"].get("class_names") or [], s["dataset"].get("label_columns") or []
    if names or columns:
        more = f"; label columns {', '.join(columns)}" if columns else ""
        print(f"labels     {len(names)} class names{more}")
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
    print(f"on disk    {human(s['bytes_stored'])} ({bpv:.3f} bytes/value: {s['compression_ratio'] or 0:.2f}x "
          f"smaller than uncompressed {s['dtype']}, {bpv / 4:.2f}x the size of float32)")


def cmd_info(args: argparse.Namespace) -> int:
    print_info(args.url, args.storage_options, args.json)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from actstore.store import verify_store

    report = verify_store(args.url, args.storage_options, progress=not args.quiet)
    for problem in report.problems:
        print(f"BAD  {problem}")
    status = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    print(f"{status}: {report.units_checked}/{report.n_units} units, {report.chunks_checked} chunks, "
          f"{human(report.bytes_checked)} checked in {report.url}")
    return 0 if report.ok else 1


def _configure(parser: argparse.ArgumentParser, command: Command) -> Command:
    parser.add_argument("url", help="store URL: a path, file://..., or s3://bucket/prefix")
    parser.add_argument("--storage-options", metavar="JSON", type=json_object,
                        help='fsspec options, e.g. \'{"anon": true}\'')
    if command is cmd_info:
        parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    else:
        add_quiet(parser)
    return command


def register(sub: Any, chosen: str | None) -> None:
    add_command(sub, "info", "Describe a store: model, layers, shape, dtype, size on disk, completeness.",
                lambda p: _configure(p, cmd_info), chosen)
    add_command(sub, "verify", "Read every chunk, check checksums and unit records; exit 1 naming bad objects.",
                lambda p: _configure(p, cmd_verify), chosen)
