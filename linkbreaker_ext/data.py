"""Image data sets behind one small interface: ``load_split(name, split, source)``.

Sources, in the order a user would reach for them:

* a folder of parquet files in the common image-dataset layout (``<root>/<name>/<split>.parquet``
  or ``<root>/<split>.parquet``; column ``image`` = {bytes, path}, column ``label``), decoded once
  and cached as ``.npz`` under ``$LINKBREAKER_CACHE`` (default ``~/.cache/linkbreaker``);
* ``"torchvision"``: torchvision's downloaders (needs internet the first time);
* ``"embedded"``: a small real MNIST subset shipped inside the package, so the demo runs offline.

Every loader returns ``(x, y)``: float32 images ``[N, C, H, W]`` in ``[0, 1]`` and int64 labels.
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

EMBEDDED_MNIST = Path(__file__).with_name("assets") / "mnist_subset.npz"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    shape: tuple  # (C, H, W)
    torchvision_name: str


DATASETS = {
    "mnist": DatasetSpec("mnist", 10, (1, 28, 28), "MNIST"),
    "cifar10": DatasetSpec("cifar10", 10, (3, 32, 32), "CIFAR10"),
    "gtsrb": DatasetSpec("gtsrb", 43, (3, 32, 32), "GTSRB"),
}


def spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(DATASETS)}") from None


def _cache_dir() -> Path:
    return Path(os.environ.get("LINKBREAKER_CACHE", Path.home() / ".cache" / "linkbreaker"))


def _to_tensors(images: np.ndarray, labels: np.ndarray):
    """uint8 [N, H, W] or [N, H, W, C] -> float32 [N, C, H, W] in [0, 1], int64 labels."""
    if images.ndim == 3:
        images = images[:, :, :, None]
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return x.contiguous(), torch.from_numpy(np.asarray(labels, dtype=np.int64))


def _find_parquet(root: Path, name: str, split: str) -> Path:
    for candidate in (root / name / f"{split}.parquet", root / f"{split}.parquet"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no {split}.parquet for {name!r} under {root} (looked in {root / name} and {root})")


def read_parquet(path: Path):
    """Decode a parquet split into uint8 images and int64 labels (cached by path, size and mtime).

    A file that changes (or is copied again, with a new mtime) replaces its one cached copy: the
    cache holds one decoded array per parquet path, never a trail of stale ones."""
    import pyarrow.parquet as pq
    from PIL import Image

    stat = path.stat()
    where = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    stem = f"{path.parent.name}-{path.stem}-{where}"
    cached = _cache_dir() / f"{stem}-{stat.st_size}-{int(stat.st_mtime)}.npz"
    if cached.is_file():
        with np.load(cached) as f:
            return f["x"], f["y"]
    table = pq.read_table(path, columns=["image", "label"])
    images = np.stack([np.asarray(Image.open(io.BytesIO(row["bytes"])))
                       for row in table.column("image").to_pylist()])
    labels = table.column("label").to_numpy().astype(np.int64)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp.npz")
        np.savez(tmp, x=images, y=labels)
        tmp.replace(cached)
        for stale in cached.parent.glob(f"{stem}-*.npz"):
            if stale != cached:
                stale.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only home is not an error: we just decode again next time
    return images, labels


def _torchvision(ds: DatasetSpec, split: str):
    import torchvision

    root = _cache_dir() / "torchvision"
    cls = getattr(torchvision.datasets, ds.torchvision_name)
    if ds.name == "gtsrb":
        data = cls(str(root), split=split, download=True)
        images = np.stack([np.asarray(img.convert("RGB").resize((32, 32))) for img, _ in data])
        labels = np.array([label for _, label in data])
        return images, labels
    data = cls(str(root), train=(split == "train"), download=True)
    return np.asarray(data.data), np.asarray(data.targets)


def load_split(name: str, split: str, source: str | os.PathLike | None = None):
    """Load ``split`` ("train" or "test") of data set ``name`` from ``source``.

    ``source`` is a parquet folder, ``"torchvision"`` or ``"embedded"`` (MNIST only; the default
    when ``source`` is None).
    """
    ds = spec(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    source = "embedded" if source is None else source
    if source == "embedded":
        if ds.name != "mnist":
            raise ValueError(f"only MNIST is embedded; give a parquet folder or 'torchvision' for {name!r}")
        with np.load(EMBEDDED_MNIST) as f:
            return _to_tensors(f[f"x_{split}"], f[f"y_{split}"])
    if source == "torchvision":
        return _to_tensors(*_torchvision(ds, split))
    return _to_tensors(*read_parquet(_find_parquet(Path(source), ds.name, split)))


def stratified_split(y: torch.Tensor, fraction: float, seed: int = 0):
    """Indices (picked, rest) with ``fraction`` of every class picked, for a clean validation set."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        picked.append(idx[: max(1, round(fraction * len(idx)))])
    picked = torch.cat(picked).sort().values
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[picked] = False
    return picked, torch.nonzero(rest).flatten()
