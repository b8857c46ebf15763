"""The SAE trainer: one pass over a store's patches, several SAEs on the same batches.

    PatchLoader (normalized batches) -> for each SAE of the sweep:
        forward (+ AuxK for topk kinds) -> backward -> [all-reduce grads] -> remove the decoder
        gradient parallel to its rows -> clip -> Adam step -> unit-norm decoder rows
        -> dead-latent tracking (tokens since each latent last fired)

Schedules are functions of the step (lr: linear warm-up, constant, linear decay to 0; sparsity
coefficient: linear warm-up), so a resumed run needs only the step, the parameters, Adam's state,
the dead-latent counters and the loader's position: `<out>/checkpoint/` holds exactly those, and a
resumed run equals an uninterrupted one. Data parallelism (`num_workers > 1`) runs the same loop in
Ray Train workers: each rank reads its own chunks, gradients are averaged with one all-reduce per
SAE, and rank 0 logs and saves.

Outputs under `out` (a path or fsspec URL): train_config.json, metrics.jsonl (one line per SAE per
log step), <name>/sae.safetensors + cfg.json per SAE (sae.checkpoint), checkpoint/.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from actstore.config import config_json
from actstore.errors import ConfigError
from actstore.loader import PatchLoader
from actstore.store._io import filesystem, put_bytes
from sae import checkpoint, metrics
from sae.config import SAEConfig
from sae.model import SparseAutoencoder

log = logging.getLogger(__name__)

STATE = "checkpoint/state.json"


@dataclass(frozen=True)
class TrainConfig:
    """One training run (a sweep of SAEs on the same batches); written to <out>/train_config.json."""

    store: str
    """Activation store URL."""
    out: str
    """Output directory (path or fsspec URL)."""
    layer: str | int = -2
    """Store layer: name, block index, or negative block index."""
    sae: tuple[Mapping[str, Any], ...] = ({"kind": "topk", "k": 32, "expansion": 16},)
    """The sweep: SAEConfig fields per SAE (d_in comes from the store); optional "name"."""
    tokens: int = 10_000_000
    """Training tokens (patches), all ranks together; the loader cycles epochs as needed."""
    batch_size: int = 4096
    """Patches per step and rank."""
    lr: float = 2e-4
    """Adam learning rate after warm-up."""
    lr_warmup_steps: int = 1000
    """Linear warm-up from 0 (capped at a tenth of the run)."""
    lr_decay_frac: float = 0.2
    """Fraction of the run, at its end, over which lr decays linearly to 0."""
    sparsity_warmup_steps: int = 1000
    """Linear warm-up of the L1 (relu) / L0 (jumprelu) coefficient (capped at a twentieth of the run)."""
    dead_window_tokens: int = 2_000_000
    """A latent that has not fired for this many tokens is dead."""
    auxk_coeff: float = 1 / 32
    """Weight of the AuxK loss (topk kinds), as in Gao et al. 2024."""
    k_aux: int | None = None
    """Dead latents in the AuxK reconstruction; default d_in // 2."""
    resample_every: int | None = 2500
    """relu: every this many steps, re-initialize dead latents toward badly reconstructed inputs."""
    grad_clip: float = 1.0
    """Max global gradient norm per SAE (0 disables)."""
    normalize: bool = True
    """Train on the loader's normalized activations (recorded in every checkpoint)."""
    buffer_bytes: int | None = None
    """Loader shuffle buffer; default the loader's."""
    seed: int = 0
    """Loader order and resampling draws."""
    amp: bool = True
    """bfloat16 autocast for the forward pass on CUDA (ignored on CPU)."""
    log_every: int = 50
    """Steps between metric lines."""
    checkpoint_every: int | None = 1000
    """Steps between resumable checkpoints (and at the end); None: only at the end."""
    num_workers: int = 1
    """Data-parallel workers through Ray Train (GPUs when the cluster has them)."""
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    """fsspec options for the store and for out."""
    tensorboard: bool = False
    """Also write TensorBoard events under <out>/tb (needs tensorboard installed)."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (needs wandb installed)."""

    def __post_init__(self) -> None:
        if isinstance(self.sae, Mapping):
            object.__setattr__(self, "sae", (self.sae,))
        object.__setattr__(self, "sae", tuple(dict(s) for s in self.sae))
        if not self.sae:
            raise ConfigError("TrainConfig: the sweep needs at least one SAE")
        names = [s.get("name") or sae_name(s) for s in self.sae]
        if len(set(names)) != len(names):
            raise ConfigError(f"TrainConfig: SAE names collide ({names}); give each a distinct 'name'")
        for name in ("tokens", "batch_size", "log_every", "num_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.lr_decay_frac <= 1 or self.lr <= 0:
            raise ConfigError("TrainConfig: need lr > 0 and 0 <= lr_decay_frac <= 1")

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.num_workers))

    def lr_at(self, step: int) -> float:
        warm = min(self.lr_warmup_steps, self.steps // 10)
        if step < warm:
            return self.lr * (step + 1) / warm
        decay_start = self.steps * (1 - self.lr_decay_frac)
        if step >= decay_start and self.lr_decay_frac > 0:
            return self.lr * max(0.0, (self.steps - step) / (self.steps - decay_start))
        return self.lr

    def sparsity_scale_at(self, step: int) -> float:
        warm = min(self.sparsity_warmup_steps, self.steps // 20)
        return min(1.0, (step + 1) / warm) if warm else 1.0


def sae_name(fields: Mapping[str, Any]) -> str:
    """A readable default name: kind, k or coefficient, expansion."""
    kind = fields.get("kind", "topk")
    size = f"x{fields['expansion']:g}" if "expansion" in fields else f"m{fields.get('d_sae', 'auto')}"
    knob = {"topk": f"k{fields.get('k', 32)}", "batchtopk": f"k{fields.get('k', 32)}",
            "relu": f"l1-{fields.get('l1_coeff', 5.0):g}", "jumprelu": f"l0-{fields.get('l0_coeff', 1.0):g}"}
    return f"{kind}-{knob.get(kind, '')}-{size}"


class _Member:
    """One SAE of the sweep with its optimizer and dead-latent counters."""

    def __init__(self, name: str, sae: SparseAutoencoder, lr: float) -> None:
        self.name, self.sae = name, sae
        self.opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), fused=True)  # ~10x faster on CPU
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
        self.members = []
        for fields in cfg.sae:
            fields = dict(fields)
            name = fields.pop("name", None) or sae_name(fields)
            sae = SparseAutoencoder(SAEConfig(d_in=d_in, **fields), device=self.device)
            self.members.append(_Member(name, sae, cfg.lr))
        self.k_aux = cfg.k_aux or d_in // 2
        self.step = 0
        self._started = False

    # persistence ------------------------------------------------------------------------
    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def _put(self, key: str, data: bytes) -> None:
        put_bytes(self.fs, self._path(key), data)

    def save_checkpoint(self) -> None:
        """Trainer state for resuming; state.json last, so a torn checkpoint is never taken."""
        if self.rank:
            return
        for m in self.members:
            self._put(f"checkpoint/{m.name}.safetensors", st_save(m.state_tensors()))
            checkpoint.save(m.sae, self._path(m.name), normalization=self.loader.normalization,
                            extra={"trained_tokens": self.step * self.cfg.batch_size * self.world_size},
                            storage_options=dict(self.cfg.storage_options))
        state = {"step": self.step, "loader": self.loader.state_dict(), "members": [m.name for m in self.members],
                 "config": json.loads(config_json(self.cfg))}
        self._put(STATE, json.dumps(state, indent=1).encode())

    def _try_resume(self) -> bool:
        try:
            state = json.loads(self.fs.cat_file(self._path(STATE)))
        except FileNotFoundError:
            return False
        saved = dict(state["config"])
        mine = json.loads(config_json(self.cfg))
        keep = ("log_every", "checkpoint_every", "tensorboard", "wandb_project", "num_workers")
        if {k: v for k, v in saved.items() if k not in keep} != {k: v for k, v in mine.items() if k not in keep}:
            raise ConfigError(f"{self.cfg.out}: holds a checkpoint of another config; choose another --out")
        for m in self.members:
            m.load_state_tensors(st_load(self.fs.cat_file(self._path(f"checkpoint/{m.name}.safetensors"))))
        self.step = int(state["step"])
        self.loader.load_state_dict(state["loader"])
        log.info("resumed %s at step %d", self.cfg.out, self.step)
        return True

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
    def _train_step(self, m: _Member, x: torch.Tensor) -> dict[str, Any]:
        cfg, sae = self.cfg, m.sae
        sae.train()
        dead = m.since_fired >= cfg.dead_window_tokens
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
            group["lr"] = cfg.lr_at(self.step)
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
    def _resample(self, m: _Member, x: torch.Tensor, x_hat: torch.Tensor) -> int:
        """relu: point dead latents at inputs drawn in proportion to their squared error (Anthropic, 2023)."""
        sae, dead = m.sae, (m.since_fired >= self.cfg.dead_window_tokens).nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        err = (x.float() - x_hat.float()).square().sum(1)
        gen = torch.Generator(device=x.device).manual_seed(self.cfg.seed * 1_000_003 + self.step)
        pick = torch.multinomial(err / err.sum(), dead.numel(), replacement=dead.numel() > err.numel(),
                                 generator=gen)
        directions = x[pick].to(sae.W_dec.dtype) - sae.b_dec
        directions /= directions.norm(dim=1, keepdim=True).clamp_min(1e-8)
        alive = torch.ones(sae.cfg.d_sae, dtype=torch.bool, device=x.device)
        alive[dead] = False
        enc_norm = sae.W_enc[alive].norm(dim=1).mean() if alive.any() else torch.tensor(1.0)
        sae.W_dec[dead] = directions
        sae.W_enc[dead] = directions * enc_norm * 0.2
        sae.b_enc[dead] = 0
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
               "loss": float(result["loss"].detach()), "lr": self.cfg.lr_at(self.step - 1),
               **metrics.batch_metrics(x, out.x_hat, out.acts),
               "dead_fraction": float((m.since_fired >= self.cfg.dead_window_tokens).double().mean()),
               "dense_fraction": metrics.dense_fraction(m.interval_fires, m.interval_tokens),
               "tokens_per_s": self.cfg.log_every * self.cfg.batch_size * self.world_size / max(seconds, 1e-9)}
        if result["auxk"] is not None:
            row["auxk"] = float(result["auxk"].detach())
        m.interval_fires.zero_()
        m.interval_tokens = 0
        return row

    def fit(self, progress: bool = True, stop_after: int | None = None) -> list[dict[str, Any]]:
        """Train to cfg.steps (or stop after `stop_after` more steps, checkpointing there); returns the last metrics."""
        cfg = self.cfg
        resumed = self._try_resume()
        if not resumed and self.rank == 0:
            self._put("train_config.json", config_json(cfg).encode())
        logger = _Logger(self, enabled=self.rank == 0)
        end = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        last: list[dict[str, Any]] = []
        bar = tqdm(total=cfg.steps * cfg.batch_size * self.world_size, initial=self.step * cfg.batch_size *
                   self.world_size, unit="tok", unit_scale=True, desc="train", disable=not progress or self.rank > 0)
        t0 = time.perf_counter()
        batches = iter(self.loader)
        while self.step < end:  # check before taking a batch: the loader's position must match the step
            x = next(batches)
            if self.step == 0 and not resumed:
                for m in self.members:
                    m.sae.init_from_data(x[:4096].float())
                    if self.world_size > 1:
                        self._broadcast_params(m.sae)
            results = [self._train_step(m, x) for m in self.members]
            self.step += 1
            for m, r in zip(self.members, results):
                if m.sae.cfg.kind == "relu" and cfg.resample_every and self.step % cfg.resample_every == 0:
                    self._resample(m, x, r["out"].x_hat)
            bar.update(x.shape[0] * self.world_size)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                now = time.perf_counter()
                last = [self._metrics(m, x, r, now - t0) for m, r in zip(self.members, results)]
                t0 = now
                logger.write(last)
                bar.set_postfix(loss=f"{last[0]['loss']:.4g}", l0=f"{last[0]['l0']:.1f}")
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < end:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        logger.close()
        self.loader.close()
        return last


class _Logger:
    """metrics.jsonl always; TensorBoard and wandb when asked.

    The file is rewritten whole at each log step (object stores cannot append); a resumed run
    keeps the lines up to its checkpoint's step and drops those logged after it.
    """

    def __init__(self, trainer: Trainer, enabled: bool) -> None:
        self.trainer, self.enabled = trainer, enabled
        self.tb = self.wandb = None
        self.lines: list[bytes] = []
        if not enabled:
            return
        path = trainer._path("metrics.jsonl")
        if trainer.step and trainer.fs.exists(path):
            self.lines = [l + b"\n" for l in trainer.fs.cat_file(path).splitlines()
                          if json.loads(l)["step"] <= trainer.step]
        cfg = trainer.cfg
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("tensorboard logging needs the tensorboard package (pip install tensorboard)") from None
            self.tb = SummaryWriter(f"{trainer.root}/tb")
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                raise ConfigError("wandb logging needs the wandb package (pip install wandb)") from None
            self.wandb = wandb.init(project=cfg.wandb_project, config=json.loads(config_json(cfg)))

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        self.lines += [json.dumps(r).encode() + b"\n" for r in rows]
        self.trainer._put("metrics.jsonl", b"".join(self.lines))
        for r in rows:
            scalars = {k: v for k, v in r.items() if isinstance(v, float)}
            if self.tb is not None:
                for k, v in scalars.items():
                    self.tb.add_scalar(f"{r['sae']}/{k}", v, r["tokens"])
            if self.wandb is not None:
                self.wandb.log({f"{r['sae']}/{k}": v for k, v in scalars.items()}, step=r["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _ray_worker(config: dict[str, Any]) -> None:
    import ray.train

    ctx = ray.train.get_context()
    cfg = TrainConfig(**config)
    Trainer(cfg, ctx.get_world_rank(), ctx.get_world_size()).fit(progress=ctx.get_world_rank() == 0)


def train(cfg: TrainConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Run a training config: in this process, or data-parallel through Ray Train."""
    if cfg.num_workers == 1:
        return Trainer(cfg).fit(progress=progress)
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    gpus = int(ray.cluster_resources().get("GPU", 0))
    trainer = TorchTrainer(_ray_worker, train_loop_config=asdict(cfg),
                           scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=gpus > 0))
    trainer.fit()
    fs, root = filesystem(cfg.out, dict(cfg.storage_options))
    lines = fs.cat_file(f"{root}/metrics.jsonl").decode().splitlines()
    return [json.loads(l) for l in lines[-len(cfg.sae):]]

