"""Trainer: one process's training loop over a sweep, its checkpoints and resume, the data-parallel collectives.

The loop, the schedules and what a checkpoint holds are described in sae.train.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from typing import Any

import fsspec
import torch
import torch.distributed as dist
from safetensors.torch import load as st_load, save as st_save
from tqdm.auto import tqdm

from actstore.config import config_json
from actstore.errors import ConfigError
from actstore.loader import PatchLoader
from actstore.outputs import check_output, marked_by
from actstore.store import filesystem, put_bytes
from sae import ForwardOutput, SAEConfig, SparseAutoencoder, checkpoint, metrics
from sae.train.config import TrainConfig, sae_name
from sae.train.sinks import open_sinks

log = logging.getLogger(__name__)

STATE = "checkpoint/state.json"
CHECKPOINT_FORMAT = 2
"""2: member tensors under checkpoint/step-<step>/, named by state.json; one loader position per rank."""
_STEP_FOLDER = re.compile(r"step-\d+")
_MAY_DIFFER = ("log_every", "checkpoint_every", "tensorboard", "wandb_project", "out", "storage_options",
               "address", "max_failures")
"""Config fields a resumed run may change (the folder may have moved, its keys rotated, the cluster);
everything else (num_workers included) must match."""


def sweep_configs(cfg: TrainConfig, d_in: int) -> list[tuple[str, SAEConfig]]:
    """(name, SAEConfig) of every SAE of the sweep on `d_in`-wide inputs; a bad one is a ConfigError."""
    out = []
    for fields in cfg.sae:
        fields = dict(fields)
        name = fields.pop("name", None) or sae_name(fields)
        out.append((name, SAEConfig(d_in=d_in, **fields)))
    return out


def step_folder(step: int) -> str:
    """The checkpoint folder of `step`, relative to the run folder."""
    return f"checkpoint/step-{step:09d}"


def read_resume_state(cfg: TrainConfig, fs: fsspec.AbstractFileSystem, root: str) -> dict[str, Any] | None:
    """The run folder's checkpoint/state.json if `cfg` may resume it (None: nothing to resume); ConfigError if not."""
    try:
        state = json.loads(fs.cat_file(f"{root}/{STATE}"))
    except FileNotFoundError:
        return None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{cfg.out}: holds a checkpoint of an older trainer (checkpoint format "
                          f"{state.get('format', 1)}, this trainer reads {CHECKPOINT_FORMAT}); choose another --out")
    saved, mine = dict(state["config"]), json.loads(config_json(cfg))
    if saved.get("num_workers") != mine["num_workers"] or len(state["loaders"]) != mine["num_workers"]:
        raise ConfigError(f"{cfg.out}: was checkpointed by num_workers={saved.get('num_workers')} (each rank's "
                          f"loader position is saved), this run has num_workers={cfg.num_workers}; resume with "
                          f"num_workers={saved.get('num_workers')} or choose another --out")
    differ = sorted(k for k in saved.keys() | mine.keys() if k not in _MAY_DIFFER and saved.get(k) != mine.get(k))
    if differ:
        raise ConfigError(f"{cfg.out}: holds a checkpoint of another config (" + ", ".join(
            f"{k}: {saved.get(k)!r} there, {mine.get(k)!r} here" for k in differ) + "); choose another --out")
    return state


def check_fresh_out(cfg: TrainConfig) -> None:
    """A fresh run writes into an empty (or missing) folder, or a run folder (train_config.json) of its own
    (overwrite=True: nothing is removed, the run writes its files over a run's that never checkpointed)."""
    check_output(cfg.out, "a training run folder", marked_by("train_config.json"), True, dict(cfg.storage_options))


def param_groups(sae: SparseAutoencoder) -> list[dict[str, Any]]:
    """Adam's parameter groups, each with its factor on the scheduled lr ("lr_scale").

    Adam moves every parameter by about lr per step, whatever the size of its gradient. A JumpReLU
    threshold is compared with pre-activations w . (x - b_dec) that the d_in entries of an encoder row
    move together, by about lr * sqrt(d_in) per step on normalized inputs (unit rms per dimension); at
    lr itself a threshold could not follow them, and in a short run it ended near where it started
    whatever l0_coeff was. Its group steps at lr * sqrt(d_in).
    """
    if sae.cfg.kind != "jumprelu":
        return [{"params": list(sae.parameters()), "lr_scale": 1.0}]
    rest = [p for name, p in sae.named_parameters() if name != "threshold"]
    return [{"params": rest, "lr_scale": 1.0}, {"params": [sae.threshold], "lr_scale": math.sqrt(sae.cfg.d_in)}]


class _Member:
    """One SAE of the sweep with its optimizer and dead-latent counters."""

    def __init__(self, name: str, sae: SparseAutoencoder, lr: float) -> None:
        self.name, self.sae = name, sae
        self.opt = torch.optim.Adam(param_groups(sae), lr=lr, betas=(0.9, 0.999), fused=True)  # ~10x faster on CPU
        device = sae.W_dec.device
        self.since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.int64, device=device)
        self.interval_fires = torch.zeros(sae.cfg.d_sae, dtype=torch.int64, device=device)
        self.interval_tokens = 0

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Parameters, buffers, Adam moments and counters, flat for safetensors."""
        out = {f"model.{k}": v.detach().contiguous() for k, v in self.sae.state_dict().items()}
        for name, p in self.sae.named_parameters():
            for key, value in self.opt.state.get(p, {}).items():
                out[f"adam.{name}.{key}"] = value.detach().reshape(-1).contiguous() if key == "step" else value
        out["since_fired"], out["interval_fires"] = self.since_fired, self.interval_fires
        out["interval_tokens"] = torch.tensor([self.interval_tokens], dtype=torch.int64)
        return {k: v.cpu() for k, v in out.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        device = self.sae.W_dec.device
        self.sae.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        for name, p in self.sae.named_parameters():
            state = {key: tensors[f"adam.{name}.{key}"].to(device) for key in ("step", "exp_avg", "exp_avg_sq")
                     if f"adam.{name}.{key}" in tensors}
            if state:
                state["step"] = state["step"].reshape(()).cpu()
                self.opt.state[p] = state
        self.since_fired.copy_(tensors["since_fired"])
        self.interval_fires.copy_(tensors["interval_fires"])
        self.interval_tokens = int(tensors["interval_tokens"])


class Trainer:
    """Runs TrainConfig on this process (rank of world_size; torch.distributed set up when > 1)."""

    def __init__(self, cfg: TrainConfig, rank: int = 0, world_size: int = 1,
                 device: torch.device | str | None = None) -> None:
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.fs, self.root = filesystem(cfg.out, dict(cfg.storage_options))
        opts = dict(cfg.storage_options) or None
        kwargs = {"buffer_bytes": cfg.buffer_bytes} if cfg.buffer_bytes else {}
        # the probe only counts batches: its buffer (np.empty) is never touched, so it costs no memory
        probe = PatchLoader(cfg.store, cfg.layer, cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world_size,
                            drop_last=True, storage_options=opts, **kwargs)
        per_epoch, d_in = len(probe), probe.d
        probe.close()
        if per_epoch == 0:
            raise ConfigError(f"{cfg.store}: fewer patches per rank than one batch of {cfg.batch_size}")
        # every rank gets at least `steps` full batches (ranks' chunk counts differ by at most one)
        epochs = math.ceil(cfg.steps / max(1, per_epoch - 1))
        self.loader = PatchLoader(cfg.store, cfg.layer, cfg.batch_size, seed=cfg.seed, epochs=epochs, rank=rank,
                                  world_size=world_size, normalize=cfg.normalize, drop_last=True,
                                  storage_options=opts, device=self.device,
                                  pin_memory=self.device.type == "cuda", **kwargs)
        self.members = [_Member(name, SparseAutoencoder(sae_cfg, device=self.device), cfg.peak_lr(sae_cfg.d_sae))
                        for name, sae_cfg in sweep_configs(cfg, d_in)]
        self.k_aux = cfg.k_aux or d_in // 2
        self.step = 0
        self.resumed_from: list[int] = []
        """The steps this run was resumed at, oldest first (kept in state.json)."""

    # persistence ------------------------------------------------------------------------
    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def _put(self, key: str, data: bytes) -> None:
        put_bytes(self.fs, self._path(key), data)

    def save_checkpoint(self) -> None:
        """Trainer state for resuming (every rank calls it: the loader positions are gathered to rank 0).

        The members' tensors go to a fresh folder checkpoint/step-<step>/, then state.json names it (written
        last: a resume reads only a complete checkpoint), then the SAEs are exported and older step folders
        removed.
        """
        mine = self.loader.state_dict()
        loaders: list[Any] = [mine]
        if self.world_size > 1:
            loaders = [None] * self.world_size
            dist.all_gather_object(loaders, mine)
        if self.rank:
            return
        folder = step_folder(self.step)
        for m in self.members:
            self._put(f"{folder}/{m.name}.safetensors", st_save(m.state_tensors()))
        state = {"format": CHECKPOINT_FORMAT, "step": self.step, "tensors": folder, "loaders": loaders,
                 "members": [m.name for m in self.members], "resumed_from": self.resumed_from,
                 "config": json.loads(config_json(self.cfg))}
        self._put(STATE, json.dumps(state, indent=1).encode())
        for m in self.members:
            url = self.fs.unstrip_protocol(self._path(m.name))  # with its s3:// (root has none)
            checkpoint.save(m.sae, url, normalization=self.loader.normalization,
                            extra={"trained_tokens": self.step * self.cfg.batch_size * self.world_size,
                                   **checkpoint.origin(self.loader.store, self.loader.layer.name,
                                                       self.loader.config.tokens)},
                            storage_options=dict(self.cfg.storage_options))
        self._remove_step_folders(keep=folder)

    def _remove_step_folders(self, keep: str) -> None:
        """Remove checkpoint/step-<n>/ folders other than `keep` (only names of that form: nothing else is ours)."""
        base = self._path("checkpoint")
        self.fs.invalidate_cache(base)
        for path in self.fs.ls(base, detail=False):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if _STEP_FOLDER.fullmatch(name) and f"checkpoint/{name}" != keep:
                self.fs.rm(path, recursive=True)

    def _resume(self, state: dict[str, Any]) -> None:
        """Continue from a state read by read_resume_state: this rank's loader position, every member's tensors."""
        for m in self.members:
            m.load_state_tensors(st_load(self.fs.cat_file(self._path(f"{state['tensors']}/{m.name}.safetensors"))))
        self.step = int(state["step"])
        self.loader.load_state_dict(state["loaders"][self.rank])
        self.resumed_from = [*state.get("resumed_from", []), self.step]
        log.info("rank %d resumed %s at step %d", self.rank, self.cfg.out, self.step)

    # distributed helpers ----------------------------------------------------------------
    def _all_reduce_grads(self, sae: SparseAutoencoder) -> None:
        grads = [p.grad for p in sae.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads]).div_(self.world_size)
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def _broadcast_params(self, sae: SparseAutoencoder) -> None:
        for t in list(sae.parameters()) + list(sae.buffers()):
            dist.broadcast(t.data, 0)

    # the loop ---------------------------------------------------------------------------
    def _init_from_data(self, x: torch.Tensor) -> None:
        """Every SAE's decoder bias from the first batch (rank 0's values on every rank)."""
        for m in self.members:
            m.sae.init_from_data(x[:4096].float())
            if self.world_size > 1:
                self._broadcast_params(m.sae)

    def _train_step(self, m: _Member, x: torch.Tensor) -> dict[str, Any]:
        cfg, sae = self.cfg, m.sae
        sae.train()
        dead = m.since_fired >= cfg.dead_window
        scale = cfg.sparsity_scale_at(self.step)
        coeff = {"relu": sae.cfg.l1_coeff, "jumprelu": sae.cfg.l0_coeff}.get(sae.cfg.kind, 0.0) * scale
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and x.is_cuda):
            out = sae(x, sparsity_coeff=coeff)
            loss = out.loss
            auxk = None
            if sae.cfg.sparse and bool(dead.any()):
                auxk = sae.auxk_loss(x, out.x_hat, dead, self.k_aux)
                loss = loss + cfg.auxk_coeff * auxk
        m.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.world_size > 1:
            self._all_reduce_grads(sae)
        sae.remove_parallel_grad()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        for group in m.opt.param_groups:
            group["lr"] = cfg.lr_at(self.step, sae.cfg.d_sae) * group["lr_scale"]
        m.opt.step()
        sae.set_decoder_norm_to_unit()
        with torch.no_grad():
            fired = metrics.firing_counts(out.acts)
            if self.world_size > 1:
                dist.all_reduce(fired)
            tokens = x.shape[0] * self.world_size
            m.since_fired.add_(tokens).masked_fill_(fired > 0, 0)
            m.interval_fires.add_(fired)
            m.interval_tokens += tokens
        return {"out": out, "loss": loss, "auxk": auxk}

    @torch.no_grad()
    def _resample(self, m: _Member, x: torch.Tensor, out: ForwardOutput) -> int:
        """relu: point dead latents at inputs drawn in proportion to their squared error (Anthropic, 2023).

        A new row's encoder bias makes it fire on the batch's tokens as often as the live latents do on
        average (the matching quantile of its pre-activations, its own input first): with the bias at 0
        (Anthropic's choice) it fired on every token on its side of b_dec, about half of them, and
        resampling then raised L0 the more, the more latents a strong L1 coefficient had killed.
        """
        sae, dead = m.sae, (m.since_fired >= self.cfg.dead_window).nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        err = (x.float() - out.x_hat.float()).square().sum(1)
        gen = torch.Generator(device=x.device).manual_seed(self.cfg.seed * 1_000_003 + self.step)
        pick = torch.multinomial(err / err.sum(), dead.numel(), replacement=dead.numel() > err.numel(),
                                 generator=gen)
        x_in = x.to(sae.W_dec.dtype) - sae.b_dec
        directions = x_in[pick]
        directions /= directions.norm(dim=1, keepdim=True).clamp_min(1e-8)
        alive = torch.ones(sae.cfg.d_sae, dtype=torch.bool, device=x.device)
        alive[dead] = False
        enc_norm = sae.W_enc[alive].norm(dim=1).mean() if alive.any() else torch.tensor(1.0)
        sae.W_dec[dead] = directions
        sae.W_enc[dead] = directions * enc_norm * 0.2
        rate = (out.acts[:, alive] > 0).float().mean() if alive.any() else torch.tensor(0.0)
        n_fire = int(min(max(1, round(float(rate) * x.shape[0])), x.shape[0]))
        pre = x_in @ sae.W_enc[dead].t()  # (B, n_dead)
        sae.b_enc[dead] = -pre.topk(n_fire, dim=0).values[-1].to(sae.b_enc.dtype)
        for p in (sae.W_dec, sae.W_enc, sae.b_enc):  # fresh moments for the new rows
            state = m.opt.state.get(p)
            if state:
                state["exp_avg"][dead] = 0
                state["exp_avg_sq"][dead] = 0
        m.since_fired[dead] = 0
        if self.world_size > 1:
            self._broadcast_params(sae)
        return int(dead.numel())

    def _metrics(self, m: _Member, x: torch.Tensor, result: dict[str, Any], seconds: float) -> dict[str, Any]:
        """This step's batch metrics; dead (over the dead window) and dense (over the log interval) fractions."""
        out = result["out"]
        row = {"step": self.step, "tokens": self.step * self.cfg.batch_size * self.world_size, "sae": m.name,
               "loss": float(result["loss"].detach()), "lr": self.cfg.lr_at(self.step - 1, m.sae.cfg.d_sae),
               **metrics.batch_metrics(x, out.x_hat, out.acts),
               "dead_fraction": float((m.since_fired >= self.cfg.dead_window).double().mean()),
               "dense_fraction": metrics.dense_fraction(m.interval_fires, m.interval_tokens),
               "tokens_per_s": self.cfg.log_every * self.cfg.batch_size * self.world_size / max(seconds, 1e-9)}
        if result["auxk"] is not None:
            row["auxk"] = float(result["auxk"].detach())
        m.interval_fires.zero_()
        m.interval_tokens = 0
        return row

    def _log_schedule(self) -> None:
        """The schedules as resolved for this run (INFO), and a warning for each given value too long for it."""
        cfg = self.cfg
        lrs = ", ".join(f"{m.name} {cfg.peak_lr(m.sae.cfg.d_sae):.3g}" for m in self.members)
        log.info("%d steps of %d tokens; lr (%s): warm-up %d steps, decay over the last %d; sparsity warm-up %d "
                 "steps; dead after %d tokens without firing; relu resampling every %s until the decay", cfg.steps,
                 cfg.tokens_per_step, lrs, cfg.lr_warmup, round(cfg.steps * cfg.lr_decay_frac), cfg.sparsity_warmup,
                 cfg.dead_window, f"{cfg.resample_interval} steps" if cfg.resample_interval else "never")
        for line in cfg.schedule_warnings():
            log.warning(line)

    def fit(self, progress: bool = True, stop_after: int | None = None, *,
            stop_at: int | None = None) -> list[dict[str, Any]]:
        """Train to cfg.steps, resuming from out's checkpoint if there is one; returns the last metrics.

        `stop_after` (steps from where this call starts) or `stop_at` (a step) stop earlier, checkpointing there.
        """
        cfg = self.cfg
        state = read_resume_state(cfg, self.fs, self.root)
        if state is not None:
            self._resume(state)
        elif self.rank == 0:  # rank 0 alone: the others would see its first writes
            check_fresh_out(cfg)
            self._put("train_config.json", config_json(cfg).encode())
        if self.rank == 0:
            self._log_schedule()
        sinks = open_sinks(cfg, self.fs, self.root, self.step, self.rank)
        end = cfg.steps
        if stop_after is not None:
            end = min(end, self.step + stop_after)
        if stop_at is not None:
            end = min(end, max(self.step, stop_at))
        last: list[dict[str, Any]] = []
        bar = tqdm(total=cfg.steps * cfg.batch_size * self.world_size, initial=self.step * cfg.batch_size *
                   self.world_size, unit="tok", unit_scale=True, desc="train", disable=not progress or self.rank > 0)
        t0 = time.perf_counter()
        batches = iter(self.loader)
        while self.step < end:  # check before taking a batch: the loader's position must match the step
            x = next(batches)
            if self.step == 0:  # also when resumed at step 0: its checkpoint holds the weights before this
                self._init_from_data(x)
            results = [self._train_step(m, x) for m in self.members]
            self.step += 1
            for m, r in zip(self.members, results):
                if m.sae.cfg.kind == "relu" and cfg.resamples_at(self.step):
                    self._resample(m, x, r["out"])
            bar.update(x.shape[0] * self.world_size)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                now = time.perf_counter()
                last = [self._metrics(m, x, r, now - t0) for m, r in zip(self.members, results)]
                t0 = now
                sinks.write(last)
                bar.set_postfix(loss=f"{last[0]['loss']:.4g}", l0=f"{last[0]['l0']:.1f}")
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < end:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        sinks.close()
        self.loader.close()
        return last
