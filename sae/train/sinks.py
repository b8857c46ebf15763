"""Where the trainer's metric rows go: metrics.jsonl always, TensorBoard and wandb when asked; rank 0 only.

A sink takes the rows of one log step (`write`) and is closed once at the end (`close`).
metrics.jsonl is appended with one open and close per log step, so every logged line is durable
as soon as it is written (on object stores the object is replaced whole on close). A resumed run
first keeps the lines up to its checkpoint's step, dropping those logged after it and a line torn
by a crash mid-append, then appends.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import fsspec

from actstore.config import public_config
from actstore.errors import ConfigError
from actstore.store import put_bytes
from sae.train.config import TrainConfig

METRICS = "metrics.jsonl"

Row = dict[str, Any]


class Sink(Protocol):
    def write(self, rows: list[Row]) -> None: ...

    def close(self) -> None: ...


def complete_lines(data: bytes) -> list[bytes]:
    """The newline-terminated lines of `data`; an unterminated last line is a torn append and is left out."""
    return data.split(b"\n")[:-1]


def read_metrics(fs: fsspec.AbstractFileSystem, root: str) -> list[Row]:
    """The rows of <root>/metrics.jsonl, in the order they were logged."""
    return [json.loads(line) for line in complete_lines(fs.cat_file(f"{root}/{METRICS}"))]


def _scalars(row: Row) -> dict[str, float]:
    return {k: v for k, v in row.items() if isinstance(v, float)}


class JsonlSink:
    """metrics.jsonl: one JSON line per row, appended (fsspec's "ab" mode works on local files and s3fs)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, step: int) -> None:
        self.fs, self.path = fs, path
        if fs.exists(path):  # once per run: keep what the checkpoint at `step` has seen (nothing on a fresh run)
            data = fs.cat_file(path)
            kept = b"".join(line + b"\n" for line in complete_lines(data) if json.loads(line)["step"] <= step)
            if kept != data:
                put_bytes(fs, path, kept)

    def write(self, rows: list[Row]) -> None:
        with self.fs.open(self.path, "ab") as f:
            f.write(b"".join(json.dumps(r).encode() + b"\n" for r in rows))

    def close(self) -> None:
        pass


class TensorBoardSink:
    """Float metrics as TensorBoard scalars `<sae>/<metric>` over training tokens."""

    def __init__(self, logdir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("tensorboard logging needs the tensorboard package (pip install tensorboard)") from None
        self.writer = SummaryWriter(logdir)

    def write(self, rows: list[Row]) -> None:
        for r in rows:
            for k, v in _scalars(r).items():
                self.writer.add_scalar(f"{r['sae']}/{k}", v, r["tokens"])

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Float metrics as `<sae>/<metric>` in a Weights & Biases run, over steps."""

    def __init__(self, project: str, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("wandb logging needs the wandb package (pip install wandb)") from None
        self.run = wandb.init(project=project, config=config)

    def write(self, rows: list[Row]) -> None:
        for r in rows:
            self.run.log({f"{r['sae']}/{k}": v for k, v in _scalars(r).items()}, step=r["step"])

    def close(self) -> None:
        self.run.finish()


class Sinks:
    """Several sinks as one (none: a rank that does not log)."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def write(self, rows: list[Row]) -> None:
        for sink in self.sinks:
            sink.write(rows)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_sinks(cfg: TrainConfig, fs: fsspec.AbstractFileSystem, root: str, step: int, rank: int) -> Sinks:
    """The sinks `cfg` asks for under `root`, on rank 0; `step` is where the run starts (0 when fresh)."""
    if rank:
        return Sinks([])
    sinks: list[Sink] = [JsonlSink(fs, f"{root}/{METRICS}", step)]
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(f"{root}/tb"))
    if cfg.wandb_project:
        sinks.append(WandbSink(cfg.wandb_project, public_config(cfg)))
    return Sinks(sinks)
