"""PatchDataset over a tiny HDF5 written here with h5py as preprocess/SCHEMA.md describes."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from hpcsrl.data import PatchDataset, available_band_sets
from hpcsrl.errors import UserError

P = 12
N = 7
CLASSES = ("forest", "water", "urban")


def make_patch_file(path, n=N, p=P, s1=True, rgb_only=False, labels=True, seed=0):
    """A schema-conformant patch file with random contents and true per-band statistics."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        f.attrs["format_version"] = 1
        f.attrs["patch_size"] = p
        f.attrs["class_names"] = list(CLASSES)
        data = {}
        if rgb_only:
            data["rgb"] = rng.integers(0, 256, (n, 3, p, p), dtype=np.uint8)
        else:
            data["data_10m"] = rng.integers(0, 10000, (n, 4, p, p), dtype=np.uint16)
            data["data_20m"] = rng.integers(0, 10000, (n, 6, p // 2, p // 2), dtype=np.uint16)
            data["data_60m"] = rng.integers(0, 10000, (n, 2, p // 6, p // 6), dtype=np.uint16)
            sup = rng.normal(1000, 300, (n, 12, p, p)).astype(np.float32)
            sup[:, 3] += 5000  # B04 far from the others: a wrong channel pick shows
            data["data_super"] = sup
            if s1:
                data["s1"] = rng.normal(-12, 3, (n, 2, p, p)).astype(np.float32)
        for name, arr in data.items():
            f[name] = arr
            f.attrs[f"mean_{name}"] = arr.astype(np.float64).mean(axis=(0, 2, 3))
            f.attrs[f"std_{name}"] = arr.astype(np.float64).std(axis=(0, 2, 3))
        if labels:
            f["label"] = np.array([i % 3 if i != 2 else -1 for i in range(n)], np.int16)
            f["classes"] = (rng.random((n, 3)) > 0.5).astype(np.uint8)
        else:
            f["label"] = np.full(n, -1, np.int16)
            f["classes"] = np.zeros((n, 0), np.uint8)
        f["scene"] = np.zeros(n, np.int32)
        f["row"] = np.arange(n, dtype=np.int32) * p
        f["col"] = np.zeros(n, np.int32)
    return data


def expected(data, name, i, channels):
    arr = data[name].astype(np.float64)
    mean = arr.mean(axis=(0, 2, 3))[channels]
    std = arr.std(axis=(0, 2, 3))[channels]
    return (arr[i, channels] - mean[:, None, None]) / std[:, None, None]


@pytest.fixture
def s1s2_file(tmp_path):
    path = tmp_path / "p.h5"
    return path, make_patch_file(path)


def test_s2_items_are_normalised_float32_with_int64_labels(s1s2_file):
    path, data = s1s2_file
    ds = PatchDataset(path, bands="s2")
    assert len(ds) == N and ds.channels == 12 and ds.patch_size == P
    assert ds.sensor == "optical" and ds.band_names[3] == "B04"
    x, y = ds[4]
    assert x.dtype == torch.float32 and x.shape == (12, P, P)
    assert y.dtype == torch.int64 and int(y) == 1
    np.testing.assert_allclose(x.numpy(), expected(data, "data_super", 4, list(range(12))),
                               rtol=1e-4, atol=1e-4)
    assert ds.class_names == CLASSES
    assert ds.labels.dtype == np.int64 and ds.labels[2] == -1 and ds.has_labels
    assert ds.multi_hot.shape == (N, 3) and ds.multi_hot.dtype == np.uint8


def test_rgb_falls_back_to_super_b04_b03_b02(s1s2_file):
    path, data = s1s2_file
    ds = PatchDataset(path, bands="rgb")
    assert ds.band_names == ("B04", "B03", "B02") and ds.channels == 3
    x, _ = ds[1]
    np.testing.assert_allclose(x.numpy(), expected(data, "data_super", 1, [3, 2, 1]),
                               rtol=1e-4, atol=1e-4)


def test_rgb_dataset_is_used_when_present(tmp_path):
    path = tmp_path / "chips.h5"
    data = make_patch_file(path, rgb_only=True)
    ds = PatchDataset(path, bands="rgb")
    assert ds.band_names == ("R", "G", "B")
    x, _ = ds[0]
    np.testing.assert_allclose(x.numpy(), expected(data, "rgb", 0, [0, 1, 2]), rtol=1e-4,
                               atol=1e-4)
    with pytest.raises(UserError, match=r"chips\.h5.*band sets: rgb"):
        PatchDataset(path, bands="s2")


def test_s2_10m_s1_and_s1s2(s1s2_file):
    path, data = s1s2_file
    ten = PatchDataset(path, bands="s2-10m")
    assert ten.channels == 4 and ten.band_names == ("B02", "B03", "B04", "B08")
    np.testing.assert_allclose(ten[3][0].numpy(), expected(data, "data_10m", 3, [0, 1, 2, 3]),
                               rtol=1e-4, atol=1e-4)
    sar = PatchDataset(path, bands="s1")
    assert sar.sensor == "sar" and sar.channels == 2
    both = PatchDataset(path, bands="s1s2")
    assert both.sensor == "s1s2" and both.channels == 14
    assert both.modality_channels == {"s2": slice(0, 12), "s1": slice(12, 14)}
    x, _ = both[5]
    np.testing.assert_allclose(x[both.modality_channels["s1"]].numpy(),
                               expected(data, "s1", 5, [0, 1]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(x[:12].numpy(), expected(data, "data_super", 5, list(range(12))),
                               rtol=1e-4, atol=1e-4)


def test_missing_band_set_names_file_and_available_sets(tmp_path):
    path = tmp_path / "nos1.h5"
    make_patch_file(path, s1=False)
    with pytest.raises(UserError) as err:
        PatchDataset(path, bands="s1s2")
    msg = str(err.value)
    assert "nos1.h5" in msg and "s1" in msg and "rgb, s2-10m, s2" in msg
    with h5py.File(path) as f:
        assert available_band_sets(set(f.keys())) == ["rgb", "s2-10m", "s2"]
    with pytest.raises(UserError, match="unknown band set"):
        PatchDataset(path, bands="s3")
    with pytest.raises(UserError, match="no such patch file"):
        PatchDataset(tmp_path / "absent.h5")


def test_indices_restrict_items_and_label_arrays(s1s2_file):
    path, data = s1s2_file
    full = PatchDataset(path)
    sub = PatchDataset(path, indices=[6, 0, 4])
    assert len(sub) == 3
    np.testing.assert_array_equal(sub.labels, full.labels[[6, 0, 4]])
    np.testing.assert_array_equal(sub.multi_hot, full.multi_hot[[6, 0, 4]])
    assert torch.equal(sub[0][0], full[6][0])
    with pytest.raises(UserError, match="out of range"):
        PatchDataset(path, indices=[N])


@pytest.mark.parametrize("bands", ["s2", "s1s2", "rgb"])
def test_read_batch_matches_getitem_in_request_order(s1s2_file, bands):
    path, _ = s1s2_file
    ds = PatchDataset(path, bands=bands, indices=[5, 3, 1, 0, 2, 4, 6])
    for request in ([4, 0, 4, 2], [1, 2, 3], [6]):  # unsorted with a duplicate, contiguous, one
        x, y = ds.read_batch(request)
        assert x.shape == (len(request), ds.channels, P, P) and y.dtype == torch.int64
        for k, i in enumerate(request):
            xi, yi = ds[i]
            assert torch.equal(x[k], xi) and int(y[k]) == int(yi)
    x, y = ds.read_batch([])
    assert x.shape == (0, ds.channels, P, P) and y.shape == (0,)


def test_unlabelled_file(tmp_path):
    path = tmp_path / "u.h5"
    make_patch_file(path, labels=False)
    ds = PatchDataset(path)
    assert not ds.has_labels and ds.multi_hot is None and int(ds[0][1]) == -1


def test_lazy_open_survives_pickle_and_forked_workers(s1s2_file):
    path, _ = s1s2_file
    ds = PatchDataset(path, bands="s1s2")
    assert ds._h5 is None  # nothing open in the parent before workers fork
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[3][0], ds[3][0])
    ds.close()
    loader = DataLoader(ds, batch_size=3, num_workers=2, multiprocessing_context="fork")
    xs = torch.cat([x for x, _ in loader])
    assert xs.shape == (N, 14, P, P)
    assert torch.equal(xs[6], ds[6][0])


def test_unreadable_file_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(UserError, match="bad.h5"):
        PatchDataset(bad)


def test_missing_virtual_source_is_refused(tmp_path):
    shard = tmp_path / "m.h5.shards" / "rank-0000.h5"
    shard.parent.mkdir()
    data = make_patch_file(shard, s1=False)
    master = tmp_path / "m.h5"
    with h5py.File(shard) as src, h5py.File(master, "w") as f:
        for name in src:
            vl = h5py.VirtualLayout(shape=src[name].shape, dtype=src[name].dtype)
            vl[:] = h5py.VirtualSource("m.h5.shards/rank-0000.h5", name, shape=src[name].shape)
            f.create_virtual_dataset(name, vl)
        f.attrs.update(src.attrs)
    x, _ = PatchDataset(master)[1]  # read through the virtual dataset
    np.testing.assert_allclose(x.numpy(), expected(data, "data_super", 1, list(range(12))),
                               rtol=1e-4, atol=1e-4)
    shard.unlink()
    with pytest.raises(UserError, match="rank-0000.h5 is missing"):
        PatchDataset(master)


def test_single_polarisation_s1(tmp_path):
    path = tmp_path / "vv.h5"
    with h5py.File(path, "w") as f:
        f["s1"] = np.ones((2, 1, P, P), np.float32)
        f.attrs["s1_bands"] = ["VV"]
        f.attrs["mean_s1"], f.attrs["std_s1"] = [0.5], [2.0]
        f["label"] = np.zeros(2, np.int16)
    ds = PatchDataset(path, bands="s1")
    assert ds.band_names == ("VV",) and ds.channels == 1
    assert torch.allclose(ds[0][0], torch.full((1, P, P), 0.25))
