"""Latency of the filtered neighbour's 3x3 median filter (``stability_median=3``): the selection
network the guard runs against the sorted-window reference, on CIFAR-10-sized images.

    python -m pytest bench/bench_median_filter.py --benchmark-only --benchmark-group-by=param:batch \
        --benchmark-columns=median,iqr
"""
import pytest
import torch

from linkbreaker_ext.verdict import median_filter, median_filter_reference

IMPLS = {"network": lambda x: median_filter(x, 3), "reference": lambda x: median_filter_reference(x, 3)}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("batch", [1, 64])
def test_median_filter(benchmark, impl, batch):
    torch.set_num_threads(1)
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    benchmark(IMPLS[impl], x)
