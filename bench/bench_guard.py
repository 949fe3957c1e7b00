"""Online latency of the whole guard (N class-restricted forwards through every masked layer, the
fused op and the consistency check) on the MNIST net, against the bare model, for a few batch sizes.

    python -m pytest bench/bench_guard.py --benchmark-only --benchmark-columns=median,iqr,ops

The guard is fitted once on the embedded MNIST subset with cheap settings and the automatic layers;
its weights are untrained because latency does not depend on them. CUDA cases run only where a GPU is present.
"""
import pytest
import torch

from linkbreaker_ext import LinkBreaker, data, models

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA"))]


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    x, y = data.load_split("mnist", "test", "embedded")
    model = models.MnistNet().eval()
    guard = LinkBreaker.fit(model, x[:600], y[:600], 10, progress=False, neighbours=0,
                            fractions=(0.5, 1.0))
    return model, guard, x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 64, 512])
@pytest.mark.parametrize("what", ["guard", "model"])
def test_online_latency(benchmark, fitted, device, batch, what):
    model, guard, x = fitted
    model.to(device)
    g = LinkBreaker(model, guard.layers, guard.late_layer, guard.masks, guard.fills, guard.thresholds,
                    guard.profile, guard.config, guard.input_shape)
    xb = x[:batch].to(device)
    fn = g if what == "guard" else model

    def run():
        with torch.no_grad():
            out = fn(xb)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark(run)
