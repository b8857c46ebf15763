"""The trainer: planted-dictionary recovery, metrics vs numpy, checkpoints, resume, Ray Train."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from actstore.errors import ConfigError
from actstore.loader import PatchLoader
from actstore.store import LayerSpec, StoreSpec, StoreWriter, TokenLayout
from sae.acts import SparseActs
from sae.checkpoint import load, read_extra
from sae.train import TrainConfig, Trainer, sae_name, train

D_IN, N_ATOMS, ACTIVE, TOKENS_PER_IMAGE = 32, 64, 3, 16


def write_planted(url: str, d: int, n_atoms: int, n_images: int) -> np.ndarray:
    """A store of sparse combinations (3 of n_atoms unit atoms, weights in [1, 2]) plus noise; returns the atoms."""
    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    spec = StoreSpec(n_images=n_images, layers=(LayerSpec("0", d, TokenLayout(cls=False, grid=(4, 4)), 0),),
                     images_per_shard=64, images_per_chunk=16, dtype="float32", backbone={"n_blocks": 1})
    writer = StoreWriter.create(url, spec)
    for k in range(spec.n_units):
        a, b = spec.unit_range(k)
        n = (b - a) * TOKENS_PER_IMAGE
        which = np.argsort(rng.random((n, n_atoms)), axis=1)[:, :ACTIVE]
        codes = np.zeros((n, n_atoms))
        np.put_along_axis(codes, which, rng.uniform(1, 2, (n, ACTIVE)), axis=1)
        x = codes @ atoms + 0.01 * rng.standard_normal((n, d))
        writer.write_unit(k, {"0": x.reshape(b - a, TOKENS_PER_IMAGE, d).astype(np.float32)})
    writer.finalize()
    return atoms


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[str, np.ndarray]:
    """3 of 64 atoms in d = 32, 8,000 tokens."""
    url = str(tmp_path_factory.mktemp("planted") / "store")
    return url, write_planted(url, D_IN, N_ATOMS, 500)


def mean_best_cosine(sae_dir: Path, atoms: np.ndarray) -> float:
    """Per true atom, its closest learned decoder direction's cosine; their mean."""
    sae, _ = load(str(sae_dir))
    w = sae.W_dec.detach().double().numpy()
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    return float((atoms @ w.T).max(axis=1).mean())


def config(store: str, out: Path, **kw) -> TrainConfig:
    base = dict(store=store, out=str(out), layer=0, batch_size=512, lr=1e-3, log_every=25, checkpoint_every=None,
                buffer_bytes=1 << 20, dead_window_tokens=50_000, resample_every=200)
    return TrainConfig(**{**base, **kw})


def test_planted_dictionary_is_recovered(planted, tmp_path):
    store, atoms = planted
    cfg = config(store, tmp_path, tokens=300_000, sae=({"kind": "topk", "k": ACTIVE, "d_sae": 128},
                                                        {"kind": "relu", "d_sae": 128, "l1_coeff": 1.0}))
    rows = Trainer(cfg).fit(progress=False)
    for row in rows:
        assert load(str(tmp_path / row["sae"]))[1] is not None  # trained behind the loader's normalization
        extra = read_extra(str(tmp_path / row["sae"]))  # what evaluate and steering rebuild the model from
        assert (extra["store"], extra["layer"]) == (store, "0") and extra["trained_tokens"] == cfg.steps * 512
        best = mean_best_cosine(tmp_path / row["sae"], atoms)
        assert best >= 0.9, (row["sae"], best, row)
    assert rows[0]["l0"] == ACTIVE


def test_a_short_cli_run_with_default_schedules_recovers_the_atoms(tmp_path, caplog):
    """96 atoms in d = 48, 20,000 tokens: 600K tokens (585 steps) reach them with the defaults (issue: 0.58)."""
    from actstore_cli import main

    store = str(tmp_path / "store")
    atoms = write_planted(store, 48, 96, 1250)
    with caplog.at_level(logging.WARNING, logger="sae.train"):
        assert main(["train", "--store", store, "--layer", "0", "--out", str(tmp_path / "run"), "--sae", "topk",
                     "--k", "3", "--d-sae", "96", "--tokens", "600000", "--batch-size", "1024", "-q"]) == 0
    assert not [r for r in caplog.records if r.name.startswith("sae.train")]  # the default schedules fit the run
    assert mean_best_cosine(tmp_path / "run/topk-k3-m96", atoms) >= 0.9


def test_default_schedules_scale_with_the_run_and_given_values_are_kept():
    def cfg(tokens: int, **kw) -> TrainConfig:
        return TrainConfig(store="s", out="o", tokens=tokens, batch_size=1000, **kw)

    short, long = cfg(600_000), cfg(100_000_000)  # 600 and 100,000 steps
    assert (short.lr_warmup, short.sparsity_warmup, short.dead_window, short.resample_interval) == (
        30, 30, 60_000, 120)
    assert (long.lr_warmup, long.sparsity_warmup, long.dead_window, long.resample_interval) == (
        1000, 1000, 2_000_000, 2500)
    assert cfg(4000).dead_window == 4000  # at least 4 steps' tokens
    given = cfg(600_000, lr=1e-3, lr_warmup_steps=100, sparsity_warmup_steps=0, dead_window_tokens=5000,
                resample_every=0)
    assert (given.lr_warmup, given.sparsity_warmup, given.dead_window, given.resample_interval) == (100, 0, 5000, 0)
    # resampling every 120 steps stops where the lr decay starts (step 480): later rows would go untrained
    assert [step for step in range(1, short.steps + 1) if short.resamples_at(step)] == [120, 240, 360]
    # lr: warm-up, constant, decay over the last lr_decay_frac; the default peak falls as 1/sqrt(d_sae)
    assert short.peak_lr(2 ** 14) == pytest.approx(2e-4) and short.peak_lr(2 ** 12) == pytest.approx(4e-4)
    assert given.peak_lr(2 ** 12) == 1e-3
    assert [short.lr_at(s, 2 ** 14) / 2e-4 for s in (0, 29, 30, 479, 480, 540, 599)] == pytest.approx(
        [1 / 30, 1, 1, 1, 1, 0.5, 1 / 120])
    assert [given.lr_at(s, 96) for s in (0, 99, 100)] == pytest.approx([1e-5, 1e-3, 1e-3])
    assert [short.sparsity_scale_at(s) for s in (0, 14, 29, 500)] == pytest.approx([1 / 30, 0.5, 1, 1])
    assert given.sparsity_scale_at(0) == 1
    warm = cfg(100_000, lr_warmup_steps=1000)  # longer than the run: lr rises until the decay takes over
    assert max(warm.lr_at(s, 96) for s in range(100)) < warm.peak_lr(96)


def test_schedule_values_too_long_for_the_run_are_warned_about_once(planted, tmp_path, caplog):
    store, _ = planted
    relu = ({"kind": "relu", "d_sae": 32},)
    with caplog.at_level(logging.WARNING, logger="sae.train"):
        Trainer(config(store, tmp_path / "default", tokens=512 * 12, sae=relu, dead_window_tokens=None,
                       resample_every=None)).fit(progress=False)
    assert not [r for r in caplog.records if r.name.startswith("sae.train")]
    long = config(store, tmp_path / "given", tokens=512 * 12, sae=relu, lr_warmup_steps=1000,
                  sparsity_warmup_steps=3, dead_window_tokens=1024, resample_every=12)
    with caplog.at_level(logging.WARNING, logger="sae.train"):
        Trainer(long).fit(progress=False)
    fix = "; leave it unset to scale it with the run"
    assert [r.getMessage() for r in caplog.records if r.name.startswith("sae.train")] == [
        "lr_warmup_steps=1000 is 8333% of this 12-step run: lr reaches its peak only after it" + fix,
        "sparsity_warmup_steps=3 is 25% of this 12-step run: the sparsity coefficient reaches its value only after it"
        + fix,
        "resample_every=12 is 100% of this 12-step run: no dead latent is ever resampled" + fix]
    # only where it matters: no sparsity coefficient nor resampling for topk
    assert [w.split("=")[0] for w in config(store, tmp_path, tokens=512 * 12, sae=({"kind": "topk"},),
                                            sparsity_warmup_steps=1000, dead_window_tokens=1536).schedule_warnings()] \
        == ["dead_window_tokens"]


def test_the_config_written_at_the_start_round_trips_and_resumes(planted, tmp_path):
    store, _ = planted
    cfg = config(store, tmp_path, tokens=512 * 6, lr=None, dead_window_tokens=None, resample_every=None,
                 sae=({"kind": "topk", "k": 4, "d_sae": 32, "name": "a"},))
    Trainer(cfg).fit(progress=False, stop_after=3)
    written = json.loads((tmp_path / "train_config.json").read_text())
    assert written["lr"] is None and written["lr_warmup_steps"] is None
    assert TrainConfig(**{k: v for k, v in written.items() if k != "type"}) == cfg
    assert Trainer(cfg).fit(progress=False)[0]["step"] == 6  # resumed: the saved config equals this one
    with pytest.raises(ConfigError, match=r"another config \(lr_warmup_steps: None there, 2 here\)"):
        Trainer(replace(cfg, lr_warmup_steps=2)).fit(progress=False)


# sparsity knobs ------------------------------------------------------------------------------
def planted_batch(store: str) -> torch.Tensor:
    """2,048 of the planted store's tokens, normalized as the trainer sees them."""
    loader = PatchLoader(store, 0, 2048, normalize=True, seed=1)
    x = next(iter(loader))
    loader.close()
    return x


def l0_on(sae, x: torch.Tensor) -> float:
    """Mean count of positive latents per token of x."""
    with torch.no_grad():
        acts = sae(x).acts
    return float(((acts.to_dense() if isinstance(acts, SparseActs) else acts) > 0).sum(1).double().mean())


@pytest.mark.parametrize("kind, knob, values", [("relu", "l1_coeff", (0.1, 1.0, 10.0)),
                                                ("jumprelu", "l0_coeff", (0.01, 1.0, 100.0)),
                                                ("topk", "k", (2, 4, 8))])
def test_a_sweep_of_the_sparsity_knob_traces_a_monotone_l0(planted, tmp_path, kind, knob, values):
    """100 steps of a sweep on the planted store, default schedules: a stronger L1 or L0 coefficient gives a
    sparser code, by a margin (each L0 at most 0.7x the one before; JumpReLU once ended at about the same L0
    for 0.01 and 100 and denser at 1 than at 100), and a larger k a denser one."""
    store, _ = planted
    sweep = tuple({"kind": kind, "d_sae": 128, knob: v, "name": f"{kind}-{v}"} for v in values)
    trainer = Trainer(config(store, tmp_path, tokens=512 * 100, sae=sweep, lr=None, dead_window_tokens=None,
                             resample_every=None))
    trainer.fit(progress=False)
    x = planted_batch(store)
    l0s = [l0_on(m.sae, x) for m in trainer.members]
    if kind == "topk":
        assert l0s == pytest.approx(list(values), abs=0.05)
    else:
        assert all(later <= 0.7 * earlier for earlier, later in zip(l0s, l0s[1:])), l0s


def test_jumprelu_thresholds_step_at_sqrt_d_in_times_the_lr(planted, tmp_path):
    """The threshold's Adam group: lr * sqrt(d_in), every other parameter at lr, through the schedule."""
    store, _ = planted
    trainer = Trainer(config(store, tmp_path, tokens=512 * 4, sae=({"kind": "jumprelu", "d_sae": 32},
                                                                   {"kind": "relu", "d_sae": 32})))
    jump, relu = trainer.members
    assert [len(g["params"]) for g in jump.opt.param_groups] == [4, 1]
    assert jump.opt.param_groups[1]["params"][0] is jump.sae.threshold
    assert len(relu.opt.param_groups) == 1
    trainer.fit(progress=False, stop_after=2)
    lr = trainer.cfg.lr_at(1, 32)
    assert jump.opt.param_groups[0]["lr"] == pytest.approx(lr)
    assert jump.opt.param_groups[1]["lr"] == pytest.approx(lr * np.sqrt(D_IN))
    assert relu.opt.param_groups[0]["lr"] == pytest.approx(lr)


def test_resampled_latents_fire_as_often_as_the_live_ones(planted, tmp_path):
    """A resampled relu latent fires on about the live latents' share of the batch's tokens, not on the
    half of them on its side of b_dec (its encoder bias was 0: strong L1 killed more latents, and resampling
    them raised L0)."""
    store, _ = planted
    trainer = Trainer(config(store, tmp_path, tokens=512 * 100, sae=({"kind": "relu", "d_sae": 128, "l1_coeff": 10},),
                             lr=None, dead_window_tokens=None, resample_every=0))
    trainer.fit(progress=False)
    member, x = trainer.members[0], planted_batch(store)
    sae = member.sae
    with torch.no_grad():
        out = sae(x)
    rate = float((out.acts[:, 16:] > 0).double().mean())
    member.since_fired[:16] = trainer.cfg.dead_window  # latents 0..15 count as dead
    assert trainer._resample(member, x, out) == 16
    with torch.no_grad():
        fired = (sae(x).acts[:, :16] > 0).double().mean(0)
    assert 0 < rate < 0.2
    assert ((fired > 0) & (fired <= 2 * rate + 0.01)).all(), (fired, rate)


def test_default_sae_names():
    assert [sae_name(s) for s in ({"kind": "matryoshka", "k": 8, "d_sae": 64}, {"kind": "batchtopk", "expansion": 4},
                                  {"kind": "relu", "l1_coeff": 3})] == ["matryoshka-k8-m64", "batchtopk-k32-x4",
                                                                        "relu-l1-3-mauto"]


def _numpy_sae_metrics(x: np.ndarray, tensors: dict[str, np.ndarray], k: int) -> dict[str, float]:
    """TopK SAE forward and metrics in plain numpy, from the saved weights."""
    pre = (x - tensors["b_dec"]) @ tensors["W_enc"].T + tensors["b_enc"]
    top = np.argsort(-pre, axis=1)[:, :k]
    acts = np.zeros_like(pre)
    np.put_along_axis(acts, top, np.maximum(np.take_along_axis(pre, top, axis=1), 0), axis=1)
    x_hat = acts @ tensors["W_dec"] + tensors["b_dec"]
    err = (x - x_hat) ** 2
    return {"mse": err.mean(), "sse_per_token": err.sum(1).mean(), "fvu": err.sum() / ((x - x.mean(0)) ** 2).sum(),
            "l0": (acts != 0).sum(1).mean(), "l1": np.abs(acts).sum(1).mean()}


def test_reported_metrics_equal_numpy(planted, tmp_path):
    store, _ = planted
    name = "m"
    cfg = config(store, tmp_path, tokens=512 * 30, log_every=30, sae=({"kind": "topk", "k": 4, "d_sae": 96, "name": name},))
    trainer = Trainer(cfg)
    loader_cfg = trainer.loader.config
    trainer.fit(progress=False, stop_after=29)  # saves the SAE as it is before step 30
    before, _ = load(str(tmp_path / name))
    tensors = {k: v.detach().double().numpy() for k, v in before.state_dict().items()}
    Trainer(cfg).fit(progress=False)  # resumes and logs step 30, computed on batch 29 with those weights
    row = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["step"] == 30 and row["sae"] == name
    replay = PatchLoader.from_config(store, loader_cfg)
    for i, x in enumerate(replay):
        if i == 29:
            break
    replay.close()
    want = _numpy_sae_metrics(x.double().numpy(), tensors, 4)
    for key, value in want.items():
        assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_resume_equals_an_uninterrupted_run(planted, tmp_path):
    store, _ = planted
    sweep = ({"kind": "topk", "k": 4, "d_sae": 96}, {"kind": "relu", "d_sae": 96, "l1_coeff": 1.0},
             {"kind": "batchtopk", "k": 4, "d_sae": 96}, {"kind": "jumprelu", "d_sae": 96})
    whole = config(store, tmp_path / "whole", tokens=512 * 40, sae=sweep, dead_window_tokens=4096, resample_every=15)
    Trainer(whole).fit(progress=False)
    parts = config(store, tmp_path / "parts", tokens=512 * 40, sae=sweep, dead_window_tokens=4096, resample_every=15)
    Trainer(parts).fit(progress=False, stop_after=0)  # a checkpoint before the first step
    Trainer(parts).fit(progress=False, stop_after=17)
    assert json.loads((tmp_path / "parts/checkpoint/state.json").read_text())["step"] == 17
    Trainer(parts).fit(progress=False)
    for f in sorted((tmp_path / "whole").glob("*/sae.safetensors")):
        assert f.read_bytes() == (tmp_path / "parts" / f.parent.name / "sae.safetensors").read_bytes(), f.parent.name
    assert (tmp_path / "whole/metrics.jsonl").read_text().count("\n") == (tmp_path / "parts/metrics.jsonl").read_text().count("\n")


def test_checkpoint_round_trip_and_other_config_refused(planted, tmp_path):
    store, _ = planted
    cfg = config(store, tmp_path, tokens=512 * 10, sae=({"kind": "topk", "k": 4, "d_sae": 96, "name": "a"},))
    trainer = Trainer(cfg)
    trainer.fit(progress=False)
    sae, norm = load(str(tmp_path / "a"))
    x = torch.randn(7, D_IN)
    trainer.members[0].sae.eval()
    assert torch.equal(sae(x).x_hat, trainer.members[0].sae(x).x_hat)
    with pytest.raises(ConfigError, match="another config"):
        Trainer(config(store, tmp_path, tokens=512 * 12, sae=cfg.sae)).fit(progress=False)


def _untimed(text: str) -> list[dict]:
    return [{k: v for k, v in json.loads(l).items() if k != "tokens_per_s"} for l in text.splitlines()]


def test_metrics_are_appended_and_a_torn_line_is_dropped_on_resume(planted, tmp_path):
    store, _ = planted
    sweep = ({"kind": "topk", "k": 4, "d_sae": 32, "name": "a"}, {"kind": "relu", "d_sae": 32, "name": "b"})
    kw = dict(tokens=512 * 12, log_every=2, checkpoint_every=6, sae=sweep)
    Trainer(config(store, tmp_path / "whole", **kw)).fit(progress=False)
    whole = (tmp_path / "whole/metrics.jsonl").read_text()
    parts = config(store, tmp_path / "parts", **kw)
    Trainer(parts).fit(progress=False, stop_after=6)  # checkpoint at step 6, a log step
    metrics = tmp_path / "parts/metrics.jsonl"
    before = metrics.read_text()
    assert [r["step"] for r in _untimed(before)] == [2, 2, 4, 4, 6, 6]
    # as if the run had gone on: logged step 8, then crashed while appending step 10
    after = whole.splitlines(keepends=True)[6:10]
    with open(metrics, "a") as f:
        f.write("".join(after[:2]) + after[2][:len(after[2]) // 2])
    Trainer(parts).fit(progress=False)
    resumed = metrics.read_text()
    assert resumed.startswith(before)  # the lines up to the checkpoint are kept as they were, then appended to
    assert _untimed(resumed) == _untimed(whole)


def test_metrics_sink_appends_on_s3(s3, s3_url):
    from actstore.store import filesystem
    from sae.train.sinks import JsonlSink, read_metrics

    fs, root = filesystem(s3_url, s3.storage_options)
    rows = [{"step": s, "sae": "a", "loss": 1.0 / s} for s in (1, 2, 3)]
    sink = JsonlSink(fs, f"{root}/metrics.jsonl", 0)
    for r in rows:
        sink.write([r])
    assert read_metrics(fs, root) == rows
    JsonlSink(fs, f"{root}/metrics.jsonl", 2).write([rows[2]])  # a resume at step 2 drops step 3, then appends
    assert read_metrics(fs, root) == rows


def _same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same SAEs (bitwise) and the same metric rows (but for tokens_per_s)."""
    saes = sorted(p.relative_to(a) for p in a.glob("*/sae.safetensors"))
    assert saes and saes == sorted(p.relative_to(b) for p in b.glob("*/sae.safetensors"))
    for f in saes:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert _untimed((a / "metrics.jsonl").read_text()) == _untimed((b / "metrics.jsonl").read_text())


def _state(run: Path) -> dict:
    return json.loads((run / "checkpoint/state.json").read_text())


def test_a_save_cut_before_state_json_resumes_from_the_checkpoint_before(planted, tmp_path):
    store, _ = planted
    sweep = ({"kind": "topk", "k": 4, "d_sae": 32, "name": "a"}, {"kind": "relu", "d_sae": 32, "name": "b"})
    kw = dict(tokens=512 * 12, log_every=4, checkpoint_every=3, sae=sweep)  # checkpoints inside log intervals
    Trainer(config(store, tmp_path / "whole", **kw)).fit(progress=False)
    parts = config(store, tmp_path / "parts", **kw)
    trainer = Trainer(parts)
    put = trainer._put

    def killed_at_state_json_of_step_9(key: str, data: bytes) -> None:
        if key == "checkpoint/state.json" and trainer.step == 9:
            raise KeyboardInterrupt  # as if killed: step 9's tensors are written, its state.json is not
        put(key, data)

    trainer._put = killed_at_state_json_of_step_9
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(progress=False)
    trainer.loader.close()
    ckpt = tmp_path / "parts/checkpoint"
    (ckpt / "notes").mkdir()  # not ours: kept
    assert sorted(p.name for p in ckpt.iterdir()) == ["notes", "state.json", "step-000000006", "step-000000009"]
    state = _state(tmp_path / "parts")
    assert state["step"] == 6 and state["tensors"] == "checkpoint/step-000000006" and len(state["loaders"]) == 1
    Trainer(parts).fit(progress=False)
    assert sorted(p.name for p in ckpt.iterdir()) == ["notes", "state.json", "step-000000012"]
    assert _state(tmp_path / "parts")["resumed_from"] == [6]
    _same_run(tmp_path / "whole", tmp_path / "parts")  # dense_fraction too: the interval's tokens are saved


# data parallel: two Ray Train workers ---------------------------------------------------------------------

DP_STEPS = 160


def dp_config(store: str, out: Path, **kw) -> TrainConfig:
    """Two workers, two SAEs (the relu one resampled at step 100), checkpoints inside log intervals."""
    sweep = ({"kind": "topk", "k": 4, "d_sae": 96, "name": "dp"}, {"kind": "relu", "d_sae": 96, "name": "r"})
    return config(store, out, **{"tokens": 512 * 2 * DP_STEPS, "num_workers": 2, "log_every": 7,
                                 "checkpoint_every": 10, "resample_every": 100, "sae": sweep, **kw})


@pytest.fixture(scope="module")
def dp_whole(ray_local, planted, tmp_path_factory) -> Path:
    """An uninterrupted two-worker run."""
    out = tmp_path_factory.mktemp("dp") / "whole"
    train(dp_config(planted[0], out), progress=False)
    return out


def test_two_ray_train_workers(dp_whole):
    lines = [json.loads(l) for l in (dp_whole / "metrics.jsonl").read_text().splitlines()]
    steps = [*range(7, DP_STEPS, 7), DP_STEPS]
    assert [l["step"] for l in lines] == [s for s in steps for _ in range(2)]
    assert lines[-1]["tokens"] == 512 * 2 * DP_STEPS
    state = _state(dp_whole)
    assert state["step"] == DP_STEPS and state["resumed_from"] == []
    assert [loader["stream"]["rank"] for loader in state["loaders"]] == [0, 1]
    assert sorted(p.name for p in (dp_whole / "checkpoint").iterdir()) == ["state.json", f"step-{DP_STEPS:09d}"]
    sae, _ = load(str(dp_whole / "dp"))
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(96), atol=1e-5)


def test_two_workers_stopped_and_resumed_equal_an_uninterrupted_run(planted, dp_whole, tmp_path):
    store, _ = planted
    cfg = dp_config(store, tmp_path)
    train(cfg, progress=False, stop_after=65)  # a checkpoint at step 65, inside a log interval
    state = _state(tmp_path)
    assert state["step"] == 65 and [loader["stream"]["rank"] for loader in state["loaders"]] == [0, 1]
    with pytest.raises(ConfigError, match="num_workers=2"):  # each rank's position is saved: same ranks only
        train(dp_config(store, tmp_path, num_workers=3), progress=False)
    with pytest.raises(ConfigError, match="num_workers=2"):
        train(dp_config(store, tmp_path, num_workers=1), progress=False)
    rows = train(cfg, progress=False)
    assert [r["step"] for r in rows] == [DP_STEPS, DP_STEPS] and _state(tmp_path)["resumed_from"] == [65]
    _same_run(dp_whole, tmp_path)


def _ray_train_workers() -> list[int]:
    """PIDs of the Ray Train workers of the Ray this process started (its descendants)."""
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name().startswith("ray::RayTrainWorker") and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def test_a_killed_worker_is_restarted_and_the_run_resumes(planted, dp_whole, tmp_path):
    store, _ = planted
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(train, dp_config(store, tmp_path), False)
        deadline = time.monotonic() + 240
        while True:  # until a checkpoint of step >= 30 (of 160) is there
            assert time.monotonic() < deadline and not run.done(), "no checkpoint"
            try:
                killed_after = _state(tmp_path)["step"]
            except (FileNotFoundError, json.JSONDecodeError):
                killed_after = 0
            if killed_after >= 30:
                break
            time.sleep(0.02)
        workers = _ray_train_workers()
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        run.result(timeout=300)
    state = _state(tmp_path)
    assert state["step"] == DP_STEPS
    resumed = state["resumed_from"]  # one restart, from the last checkpoint before the kill (or a later one)
    assert len(resumed) == 1 and killed_after <= resumed[0] < DP_STEPS, resumed
    _same_run(dp_whole, tmp_path)
