"""SAE kernels, forward and backward, against dense autograd: the eager backend always, the Triton
backend on CUDA or under Triton's CPU interpreter.

Triton's interpreter must be switched on before Python starts (TRITON_INTERPRET=1 is read when
Triton defines its `tl.*` helpers), so `test_triton_kernels_under_interpreter` re-runs this
file's Triton cases (every test id with "triton") in a subprocess with it set; in a plain CPU
process the `impl` fixture offers only the eager backend and test_triton_matches_eager skips.
Run them directly with `TRITON_INTERPRET=1 pytest tests/test_sae_kernels.py -k triton`.
Shapes: a non-power-of-two (B=7, k=3, d=33, M=50) and a power-of-two one; dtypes float32 and
bfloat16 (the reference then runs in float64 on the same bfloat16 inputs).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sae.acts import SparseActs
from sae.kernels import backend_for, dense_encode, eager_backend, sparse_decode, sparse_encode, triton_backend
from sae.kernels.topk_decode import scatter_acc

SHAPES = [(7, 3, 33, 50), (16, 4, 32, 64)]  # (B, k, d_in, d_sae)
DTYPES = [torch.float32, torch.bfloat16]


def triton_device() -> torch.device | None:
    """Where the Triton kernels can run in this process: CUDA, the CPU under the interpreter, or nowhere."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        return None  # without importing Triton
    triton = triton_backend()
    if triton is None:
        return None
    if triton.INTERPRETED:
        return torch.device("cpu")
    return torch.device("cuda") if torch.cuda.is_available() else None


TRITON_DEVICE = triton_device()


@pytest.fixture(params=["eager"] + (["triton"] if TRITON_DEVICE is not None else []))
def impl(request):
    """(backend module, device): eager on the CPU, and Triton where it can run in this process."""
    if request.param == "eager":
        return eager_backend(), torch.device("cpu")
    return triton_backend(), TRITON_DEVICE


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Elementwise agreement, scaled by the reference's magnitude (bfloat16 keeps ~3 significant digits)."""
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    expected = expected.double().cpu()
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=tol, atol=tol * scale)


def leaf(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return t.to(device=device, dtype=dtype).requires_grad_()


def f64(t: torch.Tensor) -> torch.Tensor:
    """A float64 leaf with the same (rounded) values, for the dense reference."""
    return t.detach().double().cpu().requires_grad_()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=["odd", "pow2"])
def test_sparse_decode(impl, shape, dtype):
    backend, device = impl
    B, k, d, M = shape
    g = torch.Generator().manual_seed(0)
    values = leaf(torch.randn(B * k, generator=g), dtype, device)
    indices = torch.randint(0, M, (B * k,), generator=g).to(device)
    W, b = leaf(torch.randn(M, d, generator=g), dtype, device), leaf(torch.randn(d, generator=g), dtype, device)
    acts = SparseActs(values, indices, torch.arange(0, B * k + 1, k, device=device), M)
    out = sparse_decode(acts, W, b, backend=backend)
    grad_out = torch.randn(B, d, generator=g).to(device, dtype)
    grads = torch.autograd.grad(out, (values, W, b), grad_out)

    rv, rW, rb = f64(values), f64(W), f64(b)
    ref = SparseActs(rv, indices.cpu(), acts.offsets.cpu(), M).to_dense() @ rW + rb  # dense (B x M) @ (M x d)
    close(out, ref, dtype)
    for ours, theirs in zip(grads, torch.autograd.grad(ref, (rv, rW, rb), grad_out.double().cpu())):
        close(ours, theirs, dtype)


def test_gather_acc_and_scatter_with_empty_rows(impl):
    """Variable-length rows (BatchTopK's CSR), empty ones included, and the transposed gather."""
    backend, device = impl
    g = torch.Generator().manual_seed(1)
    counts = torch.tensor([0, 3, 1, 0, 5, 2])
    offsets = torch.zeros(7, dtype=torch.long)
    offsets[1:] = counts.cumsum(0)
    n, M, d = int(counts.sum()), 9, 19
    values, indices = torch.randn(n, generator=g), torch.randint(0, M, (n,), generator=g)
    W, x = torch.randn(M, d, generator=g), torch.randn(len(counts), d, generator=g)
    rows = torch.arange(len(counts)).repeat_interleave(counts)
    dense = torch.zeros(len(counts), M).index_put((rows, indices), values, accumulate=True)
    to = {"device": device}
    out = backend.gather_acc(values.to(**to), indices.to(**to), offsets.to(**to), W.to(**to))
    close(out, dense @ W, torch.float32)
    grad_w = scatter_acc(backend, values.to(**to), indices.to(**to), rows.to(**to), x.to(**to), M)
    close(grad_w, dense.t() @ x, torch.float32)
    dots = backend.gather_dot(x.to(**to), W.to(**to), indices.to(**to), offsets.to(**to), rows.to(**to))
    close(dots, (x[rows] * W[indices]).sum(1), torch.float32)


def encoder_inputs(shape, dtype, device, seed=0):
    """x, W_enc, b_enc, b_dec: random normal."""
    B, k, d, M = shape
    g = torch.Generator().manual_seed(seed)
    return (leaf(torch.randn(B, d, generator=g), dtype, device),
            leaf(torch.randn(M, d, generator=g) / d**0.5, dtype, device),
            leaf(torch.randn(M, generator=g) * 0.1, dtype, device),
            leaf(torch.randn(d, generator=g) * 0.1, dtype, device))


def exact_inputs(shape, dtype, device, seed=0):
    """x, W_enc, b_enc, b_dec on a dyadic grid: every pre-activation is a multiple of 1/4 below 64, exact in
    bfloat16 whichever way it is computed (addmm, or a GEMM then the bias), so that masks and windows agree."""
    B, k, d, M = shape
    g = torch.Generator().manual_seed(seed)

    def grid(lo, hi, step, *size):
        return torch.randint(lo, hi + 1, size, generator=g) * step

    return (leaf(grid(-2, 2, 0.5, B, d), dtype, device), leaf(grid(-1, 1, 0.5, M, d), dtype, device),
            leaf(grid(-2, 2, 0.25, M), dtype, device), leaf(grid(-2, 2, 0.5, d), dtype, device))


@pytest.mark.parametrize("batch", [False, True], ids=["topk", "batchtopk"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=["odd", "pow2"])
def test_sparse_encode(impl, shape, dtype, batch):
    backend, device = impl
    B, k, d, M = shape
    x, W, b, b_dec = encoder_inputs(shape, dtype, device)
    acts = sparse_encode(x, W, b, b_dec, k, batch=batch, backend=backend)
    grad_values = torch.randn(acts.values.shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    grads = torch.autograd.grad(acts.values, (x, W, b, b_dec), grad_values)

    rx, rW, rb, rdec = (f64(t) for t in (x, W, b, b_dec))
    pre = (rx - rdec) @ rW.t() + rb
    rows, indices = acts.rows().cpu(), acts.indices.cpu()
    if dtype == torch.float32:  # the selection itself (bfloat16 rounding may reorder near-ties)
        if batch:
            expected = set(pre.detach().relu().view(-1).topk(k * B).indices.tolist())
            assert set((rows * M + indices).tolist()) == expected
        else:
            assert acts.counts().tolist() == [k] * B
            assert torch.equal(indices.view(B, k).sort(1).values, pre.detach().topk(k, 1).indices.sort(1).values)
    assert acts.values.numel() == k * B
    ref = pre[rows, indices].relu()  # dense autograd on the same selection
    close(acts.values, ref, dtype)
    for ours, theirs in zip(grads, torch.autograd.grad(ref, (rx, rW, rb, rdec), grad_values.double().cpu())):
        close(ours, theirs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=["odd", "pow2"])
def test_dense_encode_relu(impl, shape, dtype):
    backend, device = impl
    x, W, b, b_dec = exact_inputs(shape, dtype, device, seed=3)
    acts, l0 = dense_encode(x, W, b, b_dec, backend=backend)
    assert l0 is None
    grad_acts = torch.randn(acts.shape, generator=torch.Generator().manual_seed(4)).to(device, dtype)
    grads = torch.autograd.grad(acts, (x, W, b, b_dec), grad_acts)
    rx, rW, rb, rdec = (f64(t) for t in (x, W, b, b_dec))
    ref = ((rx - rdec) @ rW.t() + rb).relu()
    close(acts, ref, dtype)
    for ours, theirs in zip(grads, torch.autograd.grad(ref, (rx, rW, rb, rdec), grad_acts.double().cpu())):
        close(ours, theirs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=["odd", "pow2"])
def test_dense_encode_jumprelu(impl, shape, dtype):
    """Forward, L0, and the straight-through gradients, against an independent numpy formula."""
    backend, device = impl
    B, k, d, M = shape
    x, W, b, b_dec = exact_inputs(shape, dtype, device, seed=5)
    g = torch.Generator().manual_seed(6)
    # thresholds halfway between grid points, windows of +-1/4: no pre-activation sits on a boundary
    threshold = leaf(torch.randint(0, 5, (M,), generator=g) * 0.25 + 0.125, dtype, device)
    bandwidth = 0.5
    acts, l0 = dense_encode(x, W, b, b_dec, threshold, bandwidth, backend=backend)
    grad_acts = torch.randn(acts.shape, generator=g).to(device, dtype)
    grad_l0 = torch.randn(B, generator=g).to(device)
    grads = torch.autograd.grad((acts, l0), (x, W, b, b_dec, threshold), (grad_acts, grad_l0))

    pre = ((f64(x) - f64(b_dec)) @ f64(W).t() + f64(b)).detach().numpy()
    t, ga, gl = (v.detach().double().cpu().numpy() for v in (threshold, grad_acts, grad_l0))
    above = pre > t
    window = np.abs(pre - t) < bandwidth / 2
    close(acts, torch.from_numpy(pre * above), dtype)
    np.testing.assert_array_equal(l0.detach().cpu().numpy(), above.sum(1))
    grad_t = -(t / bandwidth) * (window * ga).sum(0) - (window * gl[:, None]).sum(0) / bandwidth
    close(grads[4], torch.from_numpy(grad_t), dtype)

    # x, W, b, b_dec: d act / d pre = 1 where active (the mask is a constant to autograd)
    rx, rW, rb, rdec = (f64(t) for t in (x, W, b, b_dec))
    ref = ((rx - rdec) @ rW.t() + rb) * torch.from_numpy(above)
    for ours, theirs in zip(grads[:4], torch.autograd.grad(ref, (rx, rW, rb, rdec), grad_acts.double().cpu())):
        close(ours, theirs, dtype)


@pytest.mark.skipif(TRITON_DEVICE is None, reason="Triton runs in test_triton_kernels_under_interpreter's subprocess")
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("op", ["decode", "topk", "batchtopk", "relu", "jumprelu"])
def test_triton_matches_eager(op, dtype):
    """Both backends on the same inputs, outputs and input gradients."""
    shape = SHAPES[0]
    B, k, d, M = shape
    results = []
    for backend, device in ((eager_backend(), torch.device("cpu")), (triton_backend(), TRITON_DEVICE)):
        x, W, b, b_dec = exact_inputs(shape, dtype, device, seed=7)
        threshold = leaf(torch.arange(M) % 5 * 0.25 + 0.125, dtype, device)
        if op == "decode":
            acts = sparse_encode(x, W, b, b_dec, k, backend=eager_backend())  # the same latents for both
            out, inputs = sparse_decode(acts, W, b_dec, backend=backend), (x, W, b, b_dec)
        elif op in ("topk", "batchtopk"):
            out = sparse_encode(x, W, b, b_dec, k, batch=op == "batchtopk", backend=backend).values
            inputs = (x, W, b, b_dec)
        else:
            acts, l0 = dense_encode(x, W, b, b_dec, threshold if op == "jumprelu" else None, 0.5, backend=backend)
            out = acts if l0 is None else acts + l0[:, None]
            inputs = (x, W, b, b_dec) + ((threshold,) if op == "jumprelu" else ())
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to(device, dtype)
        results.append((out, torch.autograd.grad(out, inputs, grad_out)))
    (eager_out, eager_grads), (triton_out, triton_grads) = results
    close(triton_out, eager_out, dtype)
    for ours, theirs in zip(triton_grads, eager_grads):
        close(ours, theirs, dtype)


def test_backend_selection(monkeypatch):
    cpu = torch.zeros(1)
    interpreted = triton_backend() is not None and triton_backend().INTERPRETED
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert backend_for(cpu) is eager_backend()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_for(cpu) is (triton_backend() if interpreted else eager_backend())
    monkeypatch.setenv("SAE_EAGER", "1")
    assert backend_for(cpu) is eager_backend()
    if torch.cuda.is_available():
        assert backend_for(cpu.cuda()) is eager_backend()
        monkeypatch.delenv("SAE_EAGER")
        assert backend_for(cpu.cuda()) is triton_backend()


def test_triton_kernels_under_interpreter():
    """This file's Triton cases, in a subprocess with TRITON_INTERPRET=1 (CPU tensors, tiny shapes)."""
    triton = triton_backend()
    if triton is None:
        pytest.skip("Triton does not import here")
    if triton.INTERPRETED:
        pytest.skip("already under the interpreter: the triton cases run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)), "-k",
           "triton and not under_interpreter"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-3000:]
