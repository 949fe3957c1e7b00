"""Data loading (embedded MNIST, parquet folders) and the stratified validation split."""
import io

import numpy as np
import pytest
import torch

from linkbreaker_ext import data


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Nothing is ever written to $HOME: the decode cache lives in the test's tmp folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LINKBREAKER_CACHE", str(cache))
    return cache


# ------------------------------------------------------------------------------ stratified_split

def _labels(counts, seed=0):
    y = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))]


def test_stratified_split_takes_the_fraction_of_every_class():
    counts = [8, 20, 40, 12]
    y = _labels(counts)
    picked, rest = data.stratified_split(y, 0.25, seed=0)
    assert picked.dtype == rest.dtype == torch.int64
    got = torch.bincount(y[picked], minlength=len(counts)).tolist()
    assert got == [n // 4 for n in counts]  # every count is a multiple of 4: exact
    # disjoint, covering, sorted
    assert len(set(picked.tolist()) & set(rest.tolist())) == 0
    assert torch.equal(torch.cat([picked, rest]).sort().values, torch.arange(len(y)))
    assert torch.equal(picked, picked.sort().values) and torch.equal(rest, rest.sort().values)


def test_stratified_split_keeps_every_class_and_is_deterministic():
    y = _labels([3, 50, 2], seed=1)
    a = data.stratified_split(y, 0.1, seed=4)
    b = data.stratified_split(y, 0.1, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert set(y[a[0]].tolist()) == {0, 1, 2}  # even a class of 2 contributes a sample
    assert int((y[a[0]] == 1).sum()) == 5
    others = [data.stratified_split(y, 0.1, seed=s)[0] for s in range(5, 10)]
    assert any(not torch.equal(a[0], o) for o in others)  # the seed does pick different samples


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_stratified_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction must be in"):
        data.stratified_split(torch.arange(10) % 2, fraction)


# ------------------------------------------------------------------------------ embedded MNIST

def test_embedded_mnist(_private_cache):
    x, y = data.load_split("mnist", "test", "embedded")
    assert x.dtype == torch.float32 and x.dim() == 4 and x.shape[1:] == (1, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (len(x),)
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.9  # real images, scaled to [0, 1]
    assert set(y.tolist()) == set(range(10))
    # the default source is the embedded subset
    x2, y2 = data.load_split("mnist", "test")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not _private_cache.exists()  # the embedded data needs no cache


def test_data_set_specs():
    assert data.spec("mnist").shape == (1, 28, 28) and data.spec("gtsrb").num_classes == 43
    with pytest.raises(ValueError, match="unknown data set 'svhn'"):
        data.spec("svhn")


# ------------------------------------------------------------------------------ parquet folders

def _write_parquet(path, images, labels):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rows = []
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        rows.append({"bytes": buf.getvalue(), "path": f"{i}.png"})
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array(rows, type=image_type),
                      "label": pa.array(labels, type=pa.int64())})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=n)


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_parquet_folder(tmp_path, _private_cache, layout):
    images, labels = _images(6)
    root = tmp_path / "parquet"
    target = root / "mnist" / "test.parquet" if layout == "nested" else root / "test.parquet"
    _write_parquet(target, images, labels)

    x, y = data.load_split("mnist", "test", root)
    assert x.dtype == torch.float32 and x.shape == (6, 1, 28, 28)
    assert torch.equal(x[:, 0], torch.from_numpy(images).float() / 255.0)
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()

    # decoded once, cached under $LINKBREAKER_CACHE, and the cached copy gives the same tensors
    assert len(list(_private_cache.glob("*.npz"))) == 1
    x2, y2 = data.load_split("mnist", "test", str(root))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert len(list(_private_cache.glob("*.npz"))) == 1


def test_parquet_cache_keeps_one_copy_per_file(tmp_path, _private_cache):
    """A parquet copied again (new mtime) replaces its cached copy instead of adding one; another
    folder's file of the same name keeps its own."""
    import os

    images, labels = _images(4)
    a, b = tmp_path / "a" / "mnist" / "test.parquet", tmp_path / "b" / "mnist" / "test.parquet"
    _write_parquet(a, images, labels)
    _write_parquet(b, images[::-1].copy(), labels[::-1].copy())
    xa, _ = data.load_split("mnist", "test", tmp_path / "a")
    xb, _ = data.load_split("mnist", "test", tmp_path / "b")
    assert len(list(_private_cache.glob("*.npz"))) == 2 and not torch.equal(xa, xb)
    first = {p.name for p in _private_cache.glob("*.npz")}

    later = os.stat(a).st_mtime + 100
    os.utime(a, (later, later))
    xa2, _ = data.load_split("mnist", "test", tmp_path / "a")
    assert torch.equal(xa, xa2)
    now = {p.name for p in _private_cache.glob("*.npz")}
    assert len(now) == 2 and now != first  # a's stale copy was replaced, b's kept
    assert torch.equal(data.load_split("mnist", "test", tmp_path / "b")[0], xb)


def test_parquet_rgb_images(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    _write_parquet(tmp_path / "cifar10" / "train.parquet", images, [1, 2, 3])
    x, y = data.load_split("cifar10", "train", tmp_path)
    assert x.shape == (3, 3, 32, 32)
    assert torch.equal(x, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)
    assert y.tolist() == [1, 2, 3]


def test_missing_parquet(tmp_path):
    _write_parquet(tmp_path / "mnist" / "test.parquet", *_images(2))
    with pytest.raises(FileNotFoundError, match="no train.parquet for 'mnist'"):
        data.load_split("mnist", "train", tmp_path)
    with pytest.raises(FileNotFoundError, match="no test.parquet"):
        data.load_split("mnist", "test", tmp_path / "nowhere")


def test_bad_names():
    with pytest.raises(ValueError, match="unknown data set 'imagenet'"):
        data.load_split("imagenet", "test", "embedded")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        data.load_split("mnist", "val", "embedded")
    with pytest.raises(ValueError, match="only MNIST is embedded"):
        data.load_split("cifar10", "test", "embedded")
