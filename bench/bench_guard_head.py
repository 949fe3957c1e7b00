"""Latency of the compiled guard-head op vs the plain-PyTorch reference.

Not part of the default test run (testpaths = tests). Run with e.g.

    python -m pytest bench/bench_guard_head.py --benchmark-only \
        --benchmark-group-by=param:device,param:B,param:NC,param:D --benchmark-columns=median,iqr,ops

CUDA cases run only when a GPU and the CUDA kernels are available; every timed call
synchronises the device so the numbers are end-to-end latencies.
"""
import pytest
import torch

from linkbreaker_ext.ops import backend_info, guard_head_reference

OP = torch.ops.linkbreaker.guard_head
HAS_CUDA = torch.cuda.is_available() and backend_info()["cuda_compiled"]

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")),
]
IMPLS = {
    "op": lambda *a: OP(*a),
    "reference": guard_head_reference,
}


def _inputs(B, NC, D, device):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(B, D, generator=g)
    W = torch.randn(NC, D, generator=g) / D**0.5
    b = torch.randn(NC, generator=g)
    m = torch.rand(NC, D, generator=g)
    n = torch.randn(D, generator=g)
    t = torch.full((NC,), 0.5)
    return tuple(x.to(device) for x in (f, W, b, m, n, t))


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("D", [100, 512])
@pytest.mark.parametrize("NC", [10, 43])
@pytest.mark.parametrize("B", [1, 64, 512])
@pytest.mark.parametrize("device", DEVICES)
def test_guard_head_latency(benchmark, device, B, NC, D, impl):
    args = _inputs(B, NC, D, device)
    fn = IMPLS[impl]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        out = fn(*args)
        sync()
        return out

    for _ in range(3):  # warm-up (cuBLAS handles, allocator, OpenMP pool)
        run()
    benchmark.extra_info.update(device=device, B=B, N=NC, C=NC, D=D, impl=impl)
    conf, labels, verdict = benchmark(run)
    assert conf.shape == (B, NC) and verdict.shape == (B,)
