"""Tokens/s of a full SAE training step, ours against a dense PyTorch reference step in the same run.

A step is: forward, loss, backward, removing the decoder-gradient component parallel to each
decoder row, Adam, and renormalizing the decoder rows. "ours" is sae.SparseAutoencoder (on the
CPU, the eager kernels: embedding_bag gathers, the sparse encoder backward; on a GPU, the Triton
kernels); "reference" is the textbook dense step on the same weights, the way SAELens writes it:
pre = (x - b_dec) @ W_enc.T + b_enc, the activation as a dense (B, d_sae) tensor, x_hat = acts @ W_dec
+ b_dec, autograd for the backward. Both use the same loss math (for ReLU: mse + l1_coeff *
sum(acts), as acts >= 0) and the same optimizer (torch.optim.Adam, fused). Before timing, the
first step's losses of both are checked to agree. Steps alternate between ours and the reference
so that the machine's load hits both alike; medians of the repetitions.

Goals on the CPU (d_in 768, d_sae 16384, batch 4096): TopK (k=32) >= 3x the reference; ReLU + L1
>= 1.0x (no overhead from our machinery). On a GPU, when one is present (batch 16384), the same
rows plus the reference compiled with torch.compile.

Run: .venv/bin/python benchmarks/bench_train.py [--quick] [--json out.json] [--reps N] [--device cpu|cuda]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sae import SAEConfig, SparseAutoencoder
from sae.kernels import backend_for
from _common import Parser, Run, log, machine, print_notes, print_table, print_verdict  # benchmarks/ is sys.path[0]

GOALS = {"topk": 3.0, "relu": 1.0}
NOTES = (
    "tokens/s = batch / median step time; a step = forward + backward + parallel-gradient removal + Adam (fused) "
    "+ decoder renormalization.",
    "x reference = reference step time / our step time, medians over alternated repetitions.",
    "The reference decodes densely ((B x d_sae) @ (d_sae x d_in)) and lets autograd differentiate x - b_dec, "
    "which costs it a (B x d_sae) @ (d_sae x d_in) GEMM our encoder backward replaces by -(grad_b_enc @ W_enc).",
)


@dataclass(frozen=True)
class Size:
    d_in: int
    d_sae: int
    batch: int
    k: int


FULL = {"cpu": Size(768, 16384, 4096, 32), "cuda": Size(768, 16384, 16384, 32)}
QUICK = {"cpu": Size(768, 16384, 1024, 32), "cuda": Size(768, 16384, 4096, 32)}
"""The full model sizes with a smaller batch: the ratios depend on d_sae / k, the step time on the batch."""


class DenseReference(nn.Module):
    """The plain dense SAE step's model, initialized from ours."""

    def __init__(self, sae: SparseAutoencoder) -> None:
        super().__init__()
        self.kind, self.k, self.l1_coeff = sae.cfg.kind, sae.cfg.k, sae.cfg.l1_coeff
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            setattr(self, name, nn.Parameter(getattr(sae, name).detach().clone()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b_dec) @ self.W_enc.t() + self.b_enc
        if self.kind == "topk":
            values, indices = pre.topk(self.k, dim=1, sorted=False)
            acts = torch.zeros_like(pre).scatter(1, indices, values.relu())
        else:
            acts = pre.relu()
        x_hat = acts @ self.W_dec + self.b_dec
        loss = (x_hat - x).square().sum(-1).mean()
        if self.kind == "relu":
            loss = loss + self.l1_coeff * acts.sum(-1).mean()
        return loss


def make_step(model: nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], float]:
    """One training step of `model` (parameters W_enc, b_enc, W_dec, b_dec) returning the loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    W_dec = model.W_dec

    def step(x: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(x)
        loss.backward()
        with torch.no_grad():
            grad = W_dec.grad
            grad -= torch.einsum("md,md->m", grad, W_dec).unsqueeze(1) * W_dec
        optimizer.step()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=1, keepdim=True))
        return loss.detach()

    return step


def make_ours_step(sae: SparseAutoencoder) -> Callable[[torch.Tensor], float]:
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)

    def step(x: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = sae(x).loss
        loss.backward()
        sae.remove_parallel_grad()
        optimizer.step()
        sae.set_decoder_norm_to_unit()
        return loss.detach()

    return step


def timed(step: Callable[[torch.Tensor], Any], x: torch.Tensor) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    step(x)
    sync()
    return time.perf_counter() - t0


def bench_kind(kind: str, size: Size, device: str, reps: int, compile_ref: bool) -> list[dict[str, Any]]:
    cfg = SAEConfig(d_in=size.d_in, kind=kind, d_sae=size.d_sae, k=size.k)
    generator = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(size.batch, size.d_in, device=device, generator=generator)
    sae = SparseAutoencoder(cfg, device=device)
    sae.init_from_data(x[:1024], method="mean")
    reference = DenseReference(sae)
    steps = {"ours": make_ours_step(sae), "reference": make_step(reference, reference)}
    if compile_ref:
        compiled_model = DenseReference(sae)
        steps["reference (torch.compile)"] = make_step(compiled_model, torch.compile(compiled_model))
    first = {name: float(step(x)) for name, step in steps.items()}  # warm-up (and compilation)
    for name, loss in first.items():
        if abs(loss - first["reference"]) > 1e-3 * abs(first["reference"]):
            raise RuntimeError(f"{kind}: first-step loss of {name} ({loss}) differs from the reference's "
                               f"({first['reference']})")
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            times[name].append(timed(step, x))
    ref_s = statistics.median(times["reference"])
    backend = backend_for(sae.W_enc).__name__.rsplit(".", 1)[-1].lstrip("_")
    rows = []
    for name, ts in times.items():
        s = statistics.median(ts)
        rows.append({"kind": kind, "impl": name if name != "ours" else f"ours ({backend})", "device": device,
                     "d_in": size.d_in, "d_sae": size.d_sae, "batch": size.batch,
                     "k": size.k if kind == "topk" else None,
                     "step_s": s, "tokens_per_s": size.batch / s, "x_reference": ref_s / s, "first_loss": first[name]})
    log(f"  {kind}: " + ", ".join(f"{r['impl']} {r['step_s']:.3f} s" for r in rows))
    return rows


def verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r["impl"].startswith("ours") and r["device"] == "cpu":
            goal = GOALS[r["kind"]]
            out.append({"kind": r["kind"], "device": r["device"], "x_reference": r["x_reference"], "goal": goal,
                        "pass": r["x_reference"] >= goal})
    return out


def show_results(rows: list[dict[str, Any]]) -> None:
    cols = [("kind", "kind", "{}"), ("impl", "impl", "{}"), ("device", "device", "{}"), ("batch", "batch", "{}"),
            ("d_in", "d_in", "{}"), ("d_sae", "d_sae", "{}"), ("step s", "step_s", "{:.3f}"),
            ("tokens/s", "tokens_per_s", "{:,.0f}"), ("x reference", "x_reference", "{:.2f}")]
    print_table(cols, rows, text_cols=3)


def main() -> None:
    parser = Parser(__doc__, "small sizes (under a minute)", reps=(5, 3), reps_help="timed steps per implementation")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    size = (QUICK if args.quick else FULL)[args.device]
    torch.manual_seed(0)
    bench = Run("bench_train", args)
    rows = []
    for kind in ("topk", "relu"):
        rows += bench_kind(kind, size, args.device, args.reps, compile_ref=args.device == "cuda")
    bench.stop()
    show_results(rows)
    print_notes(NOTES)
    found = verdicts(rows)
    scope = " (quick sizes: indicative only, the goals are for the full sizes)" if args.quick else ""
    for v in found:
        print_verdict(f"{v['kind']} ({v['device']}): {v['x_reference']:.2f}x the dense reference "
                      f"(goal >= {v['goal']})", v["pass"], scope)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    bench.finish({"size": size.__dict__, "machine": machine(torch_threads=torch.get_num_threads(), gpu=gpu),
                  "notes": list(NOTES), "rows": rows, "verdicts": found})


if __name__ == "__main__":
    main()
