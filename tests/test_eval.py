"""Few-label evaluation: metrics vs sklearn, stratified splits, the freeze guarantee, fine-tune,
the channel-statistics floor and the CLI's one-line errors."""

from __future__ import annotations

import copy

import h5py
import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from torch import nn

from hpcsrl.data.splits import (
    nested_label_fractions,
    stratified_subsample,
    stratified_test_split,
)
from hpcsrl.eval import metrics
from hpcsrl.eval.protocol import EvalSpec, LabelledData, is_multilabel, run_protocol
from hpcsrl.eval.report import read_csv
from hpcsrl.eval.train import FitConfig, fine_tune, fit_linear, predict
from hpcsrl.features.extract import (
    EncoderChanged,
    channel_stats,
    extract,
    state_digest,
    verify_unchanged,
)
from hpcsrl.features.knn import knn_predict

torch.set_num_threads(1)


class TinyEncoder(nn.Module):
    """A stand-in for `model.encoder`: (N, C, H, W) -> (N, feature_dim), with BatchNorm buffers."""

    def __init__(self, channels: int = 3, feature_dim: int = 8) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.net = nn.Sequential(nn.Conv2d(channels, feature_dim, 3, padding=1),
                                 nn.BatchNorm2d(feature_dim), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SneakyEncoder(TinyEncoder):
    """Breaks the freeze contract: every forward nudges a weight (the check must catch it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.net[0].weight.add_(1e-3)
        return super().forward(x)


def separable_images(n_per_class: int = 30, k: int = 3, c: int = 3, p: int = 8, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Class c shifts band (c % bands) up: separable by channel means, noisy pixel by pixel."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(k), n_per_class)
    x = rng.normal(size=(len(labels), c, p, p)).astype(np.float32)
    for cls in range(k):
        x[labels == cls, cls % c] += 2.0
    perm = rng.permutation(len(labels))
    return x[perm], labels[perm]


def array_reader(x: np.ndarray):
    return lambda idx: x[np.asarray(idx)]


FAST = FitConfig(epochs=3, batch_size=16, progress=False)


# ------------------------------------------------------------------------------- metrics
def test_metrics_match_sklearn_on_random_labels():
    rng = np.random.default_rng(1)
    for k in (2, 5, 7):
        y = rng.integers(0, k, 300)
        p = np.where(rng.random(300) < 0.4, y, rng.integers(0, k, 300))
        cm = metrics.confusion_matrix(y, p, k)
        np.testing.assert_array_equal(cm, skm.confusion_matrix(y, p, labels=range(k)))
        rep = metrics.classification_report(y, p, k)
        assert rep["oa"] == pytest.approx(skm.accuracy_score(y, p))
        assert rep["kappa"] == pytest.approx(skm.cohen_kappa_score(y, p))
        assert rep["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro"))
        np.testing.assert_allclose(rep["per_class"]["f1"],
                                   skm.f1_score(y, p, average=None, labels=range(k)))
    # a class that never occurs and is never predicted: zero-division convention matches sklearn
    y, p = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    np.testing.assert_allclose(metrics.per_class_scores(metrics.confusion_matrix(y, p, 3))["f1"],
                               skm.f1_score(y, p, average=None, labels=range(3), zero_division=0))


def test_multilabel_f1_matches_sklearn():
    rng = np.random.default_rng(2)
    t = (rng.random((200, 6)) < 0.3).astype(np.uint8)
    t[:, 5] = 0  # a label nobody has
    p = (rng.random((200, 6)) < 0.3).astype(np.uint8)
    got = metrics.multilabel_f1(t, p)
    assert got["ml_f1_micro"] == pytest.approx(skm.f1_score(t, p, average="micro"))
    assert got["ml_f1_macro"] == pytest.approx(
        skm.f1_score(t, p, average="macro", zero_division=0))


# ------------------------------------------------------------------------------- splits
def test_stratified_splits_keep_class_proportions_and_nest():
    rng = np.random.default_rng(3)
    labels = rng.permutation(np.repeat(np.arange(4), [400, 200, 100, 50]))
    labels[:7] = -1  # unknown labels never enter a split
    pool, test = stratified_test_split(labels, 0.2, seed=0)
    assert not set(pool) & set(test)
    assert set(pool) | set(test) == set(np.flatnonzero(labels >= 0))
    full = np.bincount(labels[labels >= 0], minlength=4) / (labels >= 0).sum()
    np.testing.assert_allclose(np.bincount(labels[test], minlength=4) / len(test), full, atol=0.01)
    subsets = nested_label_fractions(labels, pool, [0.1, 0.2, 0.5], seed=0)
    for f, idx in subsets.items():
        assert set(idx) <= set(pool)
        assert abs(len(idx) - f * len(pool)) <= 4
        np.testing.assert_allclose(np.bincount(labels[idx], minlength=4) / len(idx), full,
                                   atol=0.02)
    assert set(subsets[0.1]) <= set(subsets[0.2]) <= set(subsets[0.5])
    # same seed, same split; another seed, another split
    assert np.array_equal(stratified_test_split(labels, 0.2, seed=0)[1], test)
    assert not np.array_equal(stratified_test_split(labels, 0.2, seed=1)[1], test)


def test_tiny_classes_still_get_a_training_sample_and_subsample_keeps_proportions():
    labels = np.array([0] * 50 + [1] * 3)
    pool, test = stratified_test_split(labels, 0.2)
    sub = nested_label_fractions(labels, pool, [0.1], seed=0)[0.1]
    assert set(labels[sub]) == {0, 1} and set(labels[test]) == {0, 1}
    keep = stratified_subsample(np.repeat(np.arange(2), [900, 100]), 100, seed=0)
    assert len(keep) == 100 and np.bincount(np.repeat(np.arange(2), [900, 100])[keep])[1] == 10


def test_split_errors_name_the_problem():
    from hpcsrl.errors import UserError

    with pytest.raises(UserError, match="class 1 has only 1"):
        stratified_test_split(np.array([0, 0, 0, 1]), 0.2)
    with pytest.raises(UserError, match="--test-fraction"):
        stratified_test_split(np.array([0, 0, 1, 1]), 1.5)


# ------------------------------------------------------------------------------- freeze
def test_digest_sees_weight_and_buffer_changes():
    enc = TinyEncoder()
    before = state_digest(enc)
    verify_unchanged(enc, before)  # untouched: passes
    twin = copy.deepcopy(enc)
    with torch.no_grad():
        w = twin.net[0].weight
        w[0, 0, 0, 0] = torch.nextafter(w[0, 0, 0, 0], torch.tensor(10.0))  # one ulp
    with pytest.raises(EncoderChanged, match="changed"):
        verify_unchanged(twin, before)
    twin = copy.deepcopy(enc)
    twin.net[1].running_mean[0] += 0.5  # a buffer, not a parameter
    with pytest.raises(EncoderChanged):
        verify_unchanged(twin, before)


def test_freeze_protocol_leaves_encoder_bit_identical_and_reports(tmp_path):
    x, y = separable_images()
    enc = TinyEncoder()
    snapshot = copy.deepcopy(enc.state_dict())
    spec = EvalSpec(modes=("freeze",), fractions=(0.2, 0.5), seed=0, tsne=False, fit=FAST)
    rows = run_protocol(LabelledData(array_reader(x), y, ["a", "b", "c"]), {"tiny": enc}, spec,
                        tmp_path)
    for name, t in enc.state_dict().items():
        assert torch.equal(t, snapshot[name]), name
    assert enc.training  # the train/eval flag is restored too
    assert [(r["encoder"], r["mode"], r["fraction"]) for r in rows] == [
        ("tiny", "freeze", 0.2), ("tiny", "freeze", 0.5),
        ("channel-stats", "knn", 0.2), ("channel-stats", "knn", 0.5)]
    csv_rows = read_csv(tmp_path / "report.csv")
    assert len(csv_rows) == 4 and csv_rows[0]["n_test"] == str(rows[0]["n_test"])
    assert csv_rows[0]["ml_f1_micro"] == ""  # single-label data: no multi-label columns filled
    for r in rows:
        assert 0.0 <= r["oa"] <= 1.0 and -1.0 <= r["kappa"] <= 1.0
    assert (tmp_path / "confusion_tiny_freeze_20pct.csv").is_file()
    assert (tmp_path / "confusion_tiny_freeze_20pct.png").stat().st_size > 0
    rows = run_protocol(LabelledData(array_reader(x), y, ["a", "b", "c"]), {"tiny@1.5min": enc},
                        spec, tmp_path / "dots")  # a dot in the name must not clip file names
    assert (tmp_path / "dots" / "confusion_tiny_1.5min_freeze_20pct.csv").is_file()
    assert (tmp_path / "dots" / "confusion_tiny_1.5min_freeze_50pct.csv").is_file()
    per_class = read_csv(tmp_path / "per_class.csv")
    assert len(per_class) == 4 * 3


class SizeRecorder(TinyEncoder):
    """Remembers the input sizes it was fed."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: set[tuple[int, int]] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.add(tuple(x.shape[-2:]))
        return super().forward(x)


def test_input_size_resizes_recalibrates_on_the_pool_only_and_keeps_the_callers_encoder(
        tmp_path):
    x, y = separable_images()
    enc = SizeRecorder()
    snapshot = copy.deepcopy(enc.state_dict())
    seen: list[int] = []

    def reader(idx):
        seen.extend(int(i) for i in np.asarray(idx))
        return x[np.asarray(idx)]

    spec = EvalSpec(modes=("freeze",), fractions=(0.5,), tsne=False, input_sizes=(16,),
                    bn_samples=20, fit=FAST)
    rows = run_protocol(LabelledData(reader, y, ["a", "b", "c"]), {"tiny": enc}, spec, tmp_path)
    assert [r["encoder"] for r in rows] == ["tiny", "channel-stats"]
    for name, t in enc.state_dict().items():  # the caller's encoder is untouched
        assert torch.equal(t, snapshot[name]), name
    assert enc.sizes == set()  # only its resized copy ran ...
    import json
    parts = json.loads((tmp_path / "parts.json").read_text())
    calibration = seen[:20]  # ... its BN statistics came from 20 pool patches, none scored
    assert not set(calibration) & (set(parts["test"]) | set(parts["val"]))
    wrapped = run_protocol.__globals__["resized_encoders"](
        {"t": SizeRecorder()}, array_reader(x), np.arange(len(y)), 16, spec)["t"]
    wrapped.eval()(torch.from_numpy(x[:4]))
    assert wrapped.encoder.sizes == {(16, 16)}
    assert not torch.equal(wrapped.encoder.net[1].running_mean, torch.zeros(8))


def test_freeze_protocol_fails_loudly_when_the_encoder_changes(tmp_path):
    x, y = separable_images()
    spec = EvalSpec(modes=("freeze",), fractions=(0.5,), tsne=False, knn_floor=False, fit=FAST)
    with pytest.raises(EncoderChanged):
        run_protocol(LabelledData(array_reader(x), y, ["a", "b", "c"]), {"bad": SneakyEncoder()},
                     spec, tmp_path)


def test_linear_probe_learns_separable_features():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 300)
    f = rng.normal(size=(300, 5)).astype(np.float32) * 100 + 1000  # large, offset: standardised
    f[np.arange(300), y] += 300
    head = fit_linear(f[:200], y[:200], 3, FitConfig(epochs=30, lr=0.05, progress=False))
    pred, ml = predict(head, f[200:])
    assert ml is None
    assert (pred == y[200:]).mean() > 0.9


def test_multilabel_head_is_trained_when_data_is_multilabel(tmp_path):
    x, y = separable_images(n_per_class=20)
    mh = np.eye(3, dtype=np.uint8)[y]
    mh[::2, (y[::2] + 1) % 3] = 1  # half the samples carry a second label
    assert is_multilabel(mh) and not is_multilabel(np.eye(3, dtype=np.uint8)[y])
    spec = EvalSpec(modes=("freeze",), fractions=(0.5,), tsne=False, fit=FAST)
    rows = run_protocol(LabelledData(array_reader(x), y, ["a", "b", "c"], mh),
                        {"tiny": TinyEncoder()}, spec, tmp_path)
    for r in rows:
        assert 0.0 <= r["ml_f1_micro"] <= 1.0 and 0.0 <= r["ml_f1_macro"] <= 1.0


def test_multilabel_f1_counts_every_labelled_test_patch_not_only_single_label_ones(tmp_path):
    x, y = separable_images(n_per_class=30)
    mh = np.eye(3, dtype=np.uint8)[y]
    labels = y.copy()
    two = np.arange(0, len(y), 3)                 # a third of the patches carry two classes:
    mh[two, (y[two] + 1) % 3] = 1                 # no single label (-1), like BigEarthNet
    labels[two] = -1
    spec = EvalSpec(modes=("freeze", "finetune"), fractions=(0.5,), tsne=False, fit=FAST)
    rows = run_protocol(LabelledData(array_reader(x), labels, ["a", "b", "c"], mh),
                        {"tiny": TinyEncoder()}, spec, tmp_path)
    import json
    parts = json.loads((tmp_path / "parts.json").read_text())
    test = np.asarray(parts["test"])
    assert (labels[test] < 0).sum() > 0          # multi-label-only patches are in the test part
    for r in rows:
        assert r["n_test"] == len(test)          # ... and every one of them is scored
        assert 0.0 <= r["ml_f1_micro"] <= 1.0 and 0.0 <= r["ml_f1_macro"] <= 1.0


# ------------------------------------------------------------------------------- fine-tune
def test_fine_tune_changes_weights_and_protocol_keeps_callers_encoder(tmp_path):
    x, y = separable_images()
    enc = TinyEncoder()
    before = state_digest(enc)
    tuned = copy.deepcopy(enc)
    fine_tune(tuned, 8, array_reader(x), np.arange(40), y, 3, FAST)
    assert state_digest(tuned) != before
    assert not torch.equal(tuned.net[0].weight, enc.net[0].weight)
    assert not tuned.training  # handed back in eval mode for feature extraction

    spec = EvalSpec(modes=("finetune",), fractions=(0.5,), tsne=True, knn_floor=False, fit=FAST)
    rows = run_protocol(LabelledData(array_reader(x), y, ["a", "b", "c"]), {"tiny": enc}, spec,
                        tmp_path)
    assert state_digest(enc) == before
    assert [r["mode"] for r in rows] == ["finetune"]
    assert (tmp_path / "tsne_tiny.png").is_file()
    assert (tmp_path / "tsne_tiny_finetuned.png").is_file()


def test_fine_tune_recalibrates_batchnorm_to_the_final_weights():
    x, y = separable_images(n_per_class=8)  # 24 patches, 3 equal batches of 8
    tuned = TinyEncoder()
    fine_tune(tuned, 8, array_reader(x), np.arange(24), y, 3,
              FitConfig(epochs=2, batch_size=8, progress=False, augment=False))
    with torch.no_grad():
        conv = tuned.net[0](torch.from_numpy(x[:24]))
    bn = tuned.net[1]
    torch.testing.assert_close(bn.running_mean, conv.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1  # the layer's own setting is restored


def test_fine_tune_starts_from_the_given_probe_and_leaves_it_untouched():
    """LP-FT: with zero learning rates the fine-tuned head is the probe itself (a copy)."""
    x, y = separable_images(n_per_class=8)
    enc = TinyEncoder().eval()
    feats = extract({"e": enc}, array_reader(x), np.arange(24), with_stats=False,
                    progress=False)["e"]
    probe = fit_linear(feats, y[:24], 3, FitConfig(epochs=5, progress=False))
    before = copy.deepcopy(probe.state_dict())
    head = fine_tune(copy.deepcopy(enc), 8, array_reader(x), np.arange(24), y, 3,
                     FitConfig(epochs=2, batch_size=8, lr=0.0, encoder_lr=0.0, progress=False),
                     init_feats=feats, head=probe)
    assert head is not probe
    for k, v in probe.state_dict().items():
        assert torch.equal(v, before[k]) and torch.equal(head.state_dict()[k], v)


def test_fine_tune_alone_starts_from_the_probe_chosen_on_validation(tmp_path, monkeypatch):
    """Without a freeze run beside it, the starting probe is still chosen over the probe grid on
    validation, not fitted with the default weight decay (here a ruinous one)."""
    from dataclasses import replace

    import hpcsrl.eval.protocol as protocol

    x, y = separable_images()
    fitted, starts = [], []

    def tagged_fit(*a, **kw):
        head = fit_linear(*a, **kw)
        head.weight_decay = a[3].weight_decay
        fitted.append(head.weight_decay)
        return head

    def spy_fine_tune(*a, head=None, **kw):
        starts.append(head)
        return fine_tune(*a, head=head, **kw)

    monkeypatch.setattr(protocol, "fit_linear", tagged_fit)
    monkeypatch.setattr(protocol, "fine_tune", spy_fine_tune)
    spec = EvalSpec(modes=("finetune",), fractions=(0.5,), tsne=False, knn_floor=False,
                    probe_weight_decays=(0.0, 1e4), fit=replace(FAST, weight_decay=1e4))
    run_protocol(LabelledData(array_reader(x), y, ["a", "b", "c"]), {"tiny": TinyEncoder()},
                 spec, tmp_path)
    assert sorted(fitted) == [0.0, 1e4] and [h.weight_decay for h in starts] == [0.0]


def test_fine_tune_reads_per_batch_when_the_cache_is_too_small():
    x, y = separable_images(n_per_class=10)
    seen: list[int] = []

    def reader(idx):
        seen.append(len(idx))
        return x[np.asarray(idx)]

    cfg = FitConfig(epochs=2, batch_size=8, progress=False, cache_bytes=0)
    fine_tune(TinyEncoder(), 8, reader, np.arange(24), y, 3, cfg)
    assert max(seen) <= 8 and len(seen) > 4  # batches read on demand, not preloaded


# ------------------------------------------------------------------------------- floors
def test_channel_stats_knn_beats_chance_on_separable_data():
    x, y = separable_images(n_per_class=40, k=4, c=4)
    stats = channel_stats(torch.from_numpy(x)).numpy()
    assert stats.shape == (len(x), 4 * 5)
    np.testing.assert_allclose(stats[:, 0], x[:, 0].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    pred = knn_predict(stats[:100], y[:100], stats[100:])
    assert (pred == y[100:]).mean() > 0.8  # chance is 0.25
    shuffled = knn_predict(stats[:100], np.random.default_rng(0).permutation(y[:100]),
                           stats[100:])
    assert (shuffled == y[100:]).mean() < 0.6  # the floor needs the labels to mean something


def test_extract_reads_once_for_all_encoders():
    x, _ = separable_images(n_per_class=5)
    calls: list[int] = []

    def reader(idx):
        calls.append(len(idx))
        return x[np.asarray(idx)]

    out = extract({"a": TinyEncoder(), "b": TinyEncoder(feature_dim=4)}, reader,
                  np.arange(15), batch_size=4, progress=False)
    assert out["a"].shape == (15, 8) and out["b"].shape == (15, 4)
    assert out["channel_stats"].shape == (15, 15)
    assert calls == [4, 4, 4, 3]


# ------------------------------------------------------------------------------- CLI
def write_rgb_h5(path, n: int = 24, p: int = 16, labels: bool = True, seed: int = 0) -> None:
    """A minimal patch file in the SCHEMA.md layout (rgb chips), classes separable by colour."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.integers(0, 120, size=(n, 3, p, p)).astype(np.uint8)
    for c in range(3):
        x[y == c, c] += 100
    with h5py.File(path, "w") as f:
        f.create_dataset("rgb", data=x)
        f.attrs["mean_rgb"] = x.mean(axis=(0, 2, 3)).astype(np.float64)
        f.attrs["std_rgb"] = x.std(axis=(0, 2, 3)).astype(np.float64)
        f.attrs["patch_size"] = p
        f.attrs["class_names"] = ["red", "green", "blue"]
        if labels:
            f.create_dataset("label", data=y.astype(np.int16))
            f.create_dataset("classes", data=np.eye(3, dtype=np.uint8)[y])
        else:
            f.create_dataset("label", data=np.full(n, -1, np.int16))


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    from hpcsrl.cli.main import main

    code = main(["evaluate", *argv])
    return code, capsys.readouterr().err


def test_cli_one_line_errors(tmp_path, capsys):
    unlabelled = tmp_path / "nolabels.h5"
    write_rgb_h5(unlabelled, labels=False)
    labelled = tmp_path / "labels.h5"
    write_rgb_h5(labelled)
    base = ["--random-init", "--method", "lite-srl", "--backbone", "resnet18", "--out",
            str(tmp_path / "out")]
    cases = [
        (["--data", str(unlabelled), "--bands", "rgb", *base], "no labels"),
        (["--data", str(labelled), "--bands", "nonsense", *base], "band set"),
        (["--data", str(labelled), "--bands", "s2", *base], "band set"),
        (["--data", str(tmp_path / "missing.h5"), "--bands", "rgb", *base], "missing.h5"),
        (["--data", str(labelled), "--bands", "rgb", "--label-fractions", "0.1,x", *base],
         "--label-fractions"),
        (["--data", str(labelled), "--bands", "rgb", "--out", str(tmp_path / "o")], "--checkpoint"),
    ]
    for argv, needle in cases:
        code, err = run_cli(argv, capsys)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2, (argv, err)
        assert len(lines) == 1 and needle in lines[0], (argv, err)
        assert "Traceback" not in err


def test_cli_rejects_a_foreign_checkpoint(tmp_path, capsys):
    from hpcsrl.models import registry
    from hpcsrl.train.checkpoint import write_checkpoint

    labelled = tmp_path / "labels.h5"
    write_rgb_h5(labelled)
    not_ours = tmp_path / "not_ours.pt"
    torch.save({"model": {"some.other.net": torch.zeros(3)}}, not_ours)
    # a well-formed hpcsrl checkpoint whose weights belong to another architecture
    swapped = tmp_path / "swapped.pt"
    write_checkpoint(swapped, {"config": registry.build_method("simsiam").config,
                               "model": registry.build_method("lite-srl").state_dict()})
    for ckpt, needle in ((not_ours, "not an hpcsrl checkpoint"), (swapped, "architecture")):
        code, err = run_cli(["--checkpoint", str(ckpt), "--data", str(labelled), "--bands",
                             "rgb", "--out", str(tmp_path / "out")], capsys)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], err
        assert "Traceback" not in err


@pytest.mark.slow
def test_cli_end_to_end_pretrain_then_evaluate(tmp_path, capsys):
    """A real `hpcsrl pretrain` checkpoint, evaluated without --bands (the checkpoint has them)."""
    from hpcsrl.cli.main import main

    data = tmp_path / "labels.h5"
    write_rgb_h5(data, n=30, p=32)
    pre = tmp_path / "pre"
    assert main(["pretrain", "--data", str(data), "--bands", "rgb", "--epochs", "1",
                 "--batch-size", "8", "--input-size", "32", "--threads", "1", "--no-progress",
                 "--monitor-samples", "8", "--out", str(pre)]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(pre / "checkpoint.pt"), "--data", str(data),
                 "--mode", "freeze", "--label-fractions", "0.3,0.6", "--epochs", "2",
                 "--out", str(out), "--quiet", "--tsne-points", "50"]) == 0
    rows = read_csv(out / "report.csv")
    assert [(r["encoder"], r["fraction"]) for r in rows] == [
        ("lite-srl", "0.3000"), ("lite-srl", "0.6000"), ("random-init", "0.3000"),
        ("random-init", "0.6000"), ("channel-stats", "0.3000"), ("channel-stats", "0.6000")]
    assert (out / "tsne_lite-srl.png").is_file() and (out / "tsne_random-init.png").is_file()
    capsys.readouterr()


@pytest.mark.slow
def test_cli_end_to_end_random_init(tmp_path, capsys):
    data = tmp_path / "labels.h5"
    write_rgb_h5(data, n=30)
    out = tmp_path / "out"
    code = __import__("hpcsrl.cli.main", fromlist=["main"]).main([
        "evaluate", "--random-init", "--method", "lite-srl", "--backbone", "resnet18",
        "--data", str(data), "--bands", "rgb", "--mode", "both", "--label-fractions", "0.5",
        "--epochs", "1", "--out", str(out), "--no-tsne"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = read_csv(out / "report.csv")
    assert {(r["encoder"], r["mode"]) for r in rows} == {
        ("random-init", "freeze"), ("random-init", "finetune"), ("channel-stats", "knn")}
    assert "oa" in captured.out  # the readable table


@pytest.mark.slow
def test_ssl_compare_benchmark_smoke(tmp_path):
    """The benchmark's cost half on noise inputs: CSV with ratios against SimSiam, and a chart."""
    import importlib.util
    from pathlib import Path

    main_py = Path(__file__).resolve().parents[1] / "benchmarks" / "ssl_compare" / "main.py"
    spec = importlib.util.spec_from_file_location("ssl_compare_main", main_py)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--methods", "lite-srl,simsiam", "--skip-accuracy", "--warmup", "0",
                       "--rounds", "1", "--memory-steps", "1", "--batch-size", "4",
                       "--input-size", "32", "--out", str(tmp_path)]) == 0
    rows = {r["method"]: r for r in read_csv(tmp_path / "ssl_compare.csv")}
    assert float(rows["simsiam"]["params_ratio"]) == 1.0
    assert float(rows["lite-srl"]["params_ratio"]) < 0.6
    assert float(rows["lite-srl"]["mem_mb"]) > 0 and float(rows["simsiam"]["iter_ms"]) > 0
    assert (tmp_path / "ssl_compare.png").stat().st_size > 0


@pytest.mark.slow
def test_eurosat_benchmark_smoke(tmp_path):
    """The EuroSAT study end to end on a tiny file and budget: CSV, chart and summary, every
    row with validation and test figures, pre-training on the pool only."""
    import json

    bench = load_eurosat_benchmark()
    data = tmp_path / "chips.h5"
    write_rgb_h5(data, n=90, p=32)
    out = tmp_path / "study"
    assert bench.main(["--data", str(data), "--out", str(out), "--minutes", "0.05",
                       "--methods", "lite-srl,simsiam", "--stem", "imagenet",
                       "--batch-size", "8", "--snapshots", "2", "--calibration-batches", "1",
                       "--precise-bn", "8", "--monitor-samples", "8", "--probe-epochs", "2",
                       "--probe-weight-decay", "0,1e-3", "--finetune-epochs", "1",
                       "--fractions", "0.2,0.5", "--finetune-fractions", "0.5",
                       "--pilot", "lr=0.01;width=16", "--pilot-minutes", "0.02"]) == 0
    rows = read_csv(out / "study.csv")
    encoders = {r["encoder"] for r in rows}
    assert {"random-init", "channel-stats"} <= encoders
    assert {r["method"] for r in rows} >= {"lite-srl", "simsiam"}
    assert all(r["val_oa"] and r["oa"] and r["selected"] for r in rows)
    assert {r["mode"] for r in rows} == {"freeze", "freeze-stages", "finetune", "knn"}
    assert (out / "oa_vs_minutes.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["split"]["digest"] == json.loads((out / "split.json").read_text())["digest"]
    pilot = summary["pilot"]  # the recipe chosen on validation (the pilot never scores test)
    assert {c["recipe"] for c in pilot["candidates"]} == {"lr=0.01", "width=16"}
    chosen = summary["recipe"]
    assert all(chosen[k] == v for k, v in pilot["chosen"].items())
    ckpt = torch.load(out / "pretrain" / "lite-srl" / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["config"].get("width", 64) == chosen["width"]  # 32 by default, 16 if it won
    assert pilot["chosen_val_oa"] == max(c["val_oa"] for c in pilot["candidates"])
    pilot_rows = read_csv(out / "pilot" / "eval" / "report.csv")
    assert all(r["oa"] in ("", "nan") and r["val_oa"] for r in pilot_rows), pilot_rows
    assert ckpt["data"]["split"]["pretrain_on"] == "pool"


def test_validation_only_run_never_reads_the_test_part(tmp_path):
    """score_test=False (choosing a recipe): no test patch is read, rows carry validation only."""
    x, y = separable_images()
    seen: set[int] = set()

    def reader(idx):
        seen.update(int(i) for i in np.asarray(idx))
        return x[np.asarray(idx)]

    spec = EvalSpec(modes=("freeze", "finetune"), fractions=(0.5,), tsne=True, fit=FAST,
                    score_test=False)
    rows = run_protocol(LabelledData(reader, y, ["a", "b", "c"]), {"tiny": TinyEncoder()}, spec,
                        tmp_path)
    import json
    split = json.loads((tmp_path / "parts.json").read_text())
    assert split["test"] == [] and split["val"]
    from hpcsrl.data.splits import Layout, make_split
    test = make_split(Layout.from_arrays(y)).test
    assert not seen & set(test.tolist())
    for r in rows:
        assert np.isnan(r["oa"]) and r["n_test"] == 0 and 0 <= r["val_oa"] <= 1


def load_eurosat_benchmark():
    import importlib.util
    from pathlib import Path

    main_py = Path(__file__).resolve().parents[1] / "benchmarks" / "eurosat" / "main.py"
    spec = importlib.util.spec_from_file_location("eurosat_main", main_py)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_eurosat_budget_snapshot_is_the_one_nearest_the_budget():
    """An over-planned run goes past the budget to the 1.05 x cap: the fine-tuned and summarised
    encoder is the snapshot at the budget, not the last one."""
    bench = load_eurosat_benchmark()
    run = {"snapshots": [{"minutes": 60.4}, {"minutes": 120.24}, {"minutes": 126.57}]}
    assert bench.at_budget("lite-srl", run, 120) == "lite-srl@120.24min"
    assert bench.at_budget("simsiam", {"snapshots": [{"minutes": 59.0}, {"minutes": 117.5}]},
                           120) == "simsiam@117.5min"


def test_eurosat_snapshot_chosen_on_validation_within_the_budget():
    """Early stopping on validation: the best validation OA among the snapshots up to the one at
    the budget (a later, capped snapshot is not a candidate), reported with its test OA."""
    bench = load_eurosat_benchmark()

    def row(minutes, val, test, mode="freeze", method="lite-srl"):
        return {"encoder": f"{method}@{minutes}min", "method": method, "minutes": minutes,
                "mode": mode, "fraction": 0.1, "val_oa": val, "oa": test}

    rows = [row(30.0, 0.80, 0.81), row(90.34, 0.855, 0.8504), row(120.24, 0.853, 0.846),
            row(126.57, 0.90, 0.90), row(120.24, 0.889, 0.881, mode="freeze-stages"),
            row(90.34, 0.882, 0.876, mode="freeze-stages"), row(60.0, 0.7, 0.7, method="simsiam"),
            row(120.1, 0.7, 0.71, method="simsiam"),
            {**row(0, 0.99, 0.99), "method": "random-init", "encoder": "random-init"}]
    chosen = {(c["method"], c["mode"]): c for c in bench.chosen_on_validation(rows, 120)}
    assert set(chosen) == {("lite-srl", "freeze"), ("lite-srl", "freeze-stages"),
                           ("simsiam", "freeze")}
    assert chosen["lite-srl", "freeze"]["encoder"] == "lite-srl@90.34min"
    assert chosen["lite-srl", "freeze"]["oa"] == 0.8504
    assert chosen["lite-srl", "freeze"]["candidates"] == 3
    assert chosen["lite-srl", "freeze-stages"]["minutes"] == 120.24
    assert chosen["simsiam", "freeze"]["minutes"] == 60.0  # a tie goes to the earlier snapshot


def test_eurosat_combine_merges_methods_and_refuses_other_recipes(tmp_path):
    """Studies of different methods (same split and recipe) merge into one table, plot and
    summary with the floors once; another split, recipe or a method twice is refused."""
    import json

    bench = load_eurosat_benchmark()
    recipe = {"width": 32, "minutes": 120, "threads": 2, "jobs": 1}

    def study(name, method, oa, floor_oa, **changes):
        folder = tmp_path / name
        folder.mkdir()
        rows = [{"encoder": f"{method}@120min", "method": method, "minutes": 120.0, "epoch": 9,
                 "mode": "freeze", "fraction": 0.1, "val_oa": oa, "oa": oa, "selected": "wd 0"},
                {"encoder": "random-init", "method": "random-init", "minutes": 0.0, "epoch": 0,
                 "mode": "freeze", "fraction": 0.1, "val_oa": floor_oa, "oa": floor_oa,
                 "selected": "wd 0"}]
        bench.write_csv(folder / "study.csv", rows)
        summary = {"budget_minutes": 120, "methods": [method],
                   "recipe": {**recipe, **changes.get("recipe", {})},
                   "split": {"digest": changes.get("digest", "abc")},
                   "pretrain": {method: {"minutes": 126.0, "epochs_done": 9}},
                   "final": [{"encoder": r["encoder"], "oa": r["oa"]} for r in rows],
                   "command": f"main.py --methods {method}"}
        (folder / "summary.json").write_text(json.dumps(summary))
        return str(folder)

    a = study("a", "lite-srl", 0.85, 0.64)
    b = study("b", "simsiam", 0.80, 0.6405)
    out = tmp_path / "both"
    assert bench.main(["--out", str(out), "--combine", f"{a},{b}"]) == 0
    rows = read_csv(out / "study.csv")
    assert [r["encoder"] for r in rows].count("random-init") == 1
    assert {r["method"] for r in rows} == {"lite-srl", "simsiam", "random-init"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == ["lite-srl", "simsiam"]
    assert summary["floor_max_test_oa_difference"] == pytest.approx(0.0005)
    assert [f["encoder"] for f in summary["final"]].count("random-init") == 1
    assert {c["method"] for c in summary["chosen_on_validation"]} == {"lite-srl", "simsiam"}
    assert (out / "oa_vs_minutes.png").stat().st_size > 0
    table = (out / "table.md").read_text().splitlines()
    assert "| lite-srl@120min (epoch 9) | 0.850 / 0.850 |" in table
    assert "| random-init | 0.640 / 0.640 |" in table and len(table) == 2 + 2 + 3
    for bad, why in ((study("c", "simsiam", 0.8, 0.64, digest="xyz"), "split"),
                     (study("d", "simsiam", 0.8, 0.64, recipe={"threads": 1}), "threads"),
                     (a, "two studies"), (str(tmp_path / "none"), "not a finished study")):
        with pytest.raises(SystemExit, match=why):
            bench.main(["--out", str(tmp_path / "x"), "--combine", f"{a},{bad}"])
    with pytest.raises(SystemExit):
        bench.main(["--out", str(out)])  # --data and --minutes are needed to run a study
