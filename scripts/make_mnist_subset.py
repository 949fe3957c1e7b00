"""Rebuild the MNIST subset embedded in the package (linkbreaker_ext/assets/mnist_subset.npz).

    python scripts/make_mnist_subset.py ../shared/data

A fixed, seeded, class-stratified sample of the real MNIST splits, stored as compressed uint8.
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from linkbreaker_ext.data import _find_parquet, read_parquet  # noqa: E402

N_TRAIN, N_TEST = 12000, 3000


def sample(y, n, rng):
    per_class = n // 10
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False)
                                   for c in range(10)]))


def main(root):
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        x, y = read_parquet(_find_parquet(Path(root), "mnist", split))
        idx = sample(y, n, rng)
        out[f"x_{split}"], out[f"y_{split}"] = x[idx].astype(np.uint8), y[idx].astype(np.int64)
    target = Path(__file__).resolve().parents[1] / "linkbreaker_ext" / "assets" / "mnist_subset.npz"
    np.savez_compressed(target, **out)
    print(target, f"{target.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
