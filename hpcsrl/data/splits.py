"""Test / validation / pool split of a patch file, recorded once in split.json and read by every
command (pre-training, BatchNorm re-estimation, evaluation) so no test patch is ever trained on.

Three disjoint parts: `test` (touched once per reported figure), `val` (every choice is made on
it) and `pool` (pre-training reads it; the labelled fractions 10 % < 20 % < 50 % are nested
subsets of it). How patches are grouped before splitting:

- `chip`: every scene is a single patch (EuroSAT, BigEarthNet folders): stratified per patch.
- `scene`: tiled scenes, at least `min_groups` of them: whole scenes (scenes whose footprints
  overlap, e.g. two dates of one place, form one group) go to one side.
- `block`: too few scenes: square blocks of patches in map coordinates; a non-test patch that
  touches a test patch (and a pool patch that touches a validation patch) is left out of every
  part (`guard`), so no test patch has a neighbour in the pool.

The split depends only on the file's labels and patch positions (its `fingerprint`) and the
seed: identical for any preprocessing or training rank count, and refused for another file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpcsrl.data.dataset import PatchDataset
from hpcsrl.errors import UserError
from hpcsrl.fileio import write_json

SPLIT_FORMAT = 1
PRETRAIN_ON = ("pool", "all")
_UNGEOREFERENCED = (0.0, 10.0, 0.0, 0.0, 0.0, -10.0)  # what readers record without a geotransform


# --------------------------------------------------------------------------- stratified helpers
def _per_class_permutations(labels: np.ndarray, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Indices of each class (labels >= 0), each shuffled independently."""
    classes = np.unique(labels[labels >= 0])
    return {int(c): rng.permutation(np.flatnonzero(labels == c)) for c in classes}


def _take_count(n_class: int, fraction: float) -> int:
    """Round to the nearest count but keep at least one sample of every class."""
    return min(n_class, max(1, int(round(fraction * n_class))))


def stratified_test_split(labels: np.ndarray, test_fraction: float, seed: int = 0
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(pool, test) index arrays over samples with a known label (>= 0), class proportions kept.

    Every class needs at least two samples so that both sides get one.
    """
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    pool, test = [], []
    for c, idx in _per_class_permutations(labels, rng).items():
        if len(idx) < 2:
            raise UserError(f"class {c} has only {len(idx)} labelled sample(s); a stratified "
                            "test split needs at least 2 per class (add data or drop the class)")
        n_test = min(len(idx) - 1, _take_count(len(idx), test_fraction))
        test.append(idx[:n_test])
        pool.append(idx[n_test:])
    if not pool:
        raise UserError("no labelled samples (all labels are -1)")
    return np.sort(np.concatenate(pool)), np.sort(np.concatenate(test))


def nested_label_fractions(labels: np.ndarray, pool: np.ndarray, fractions: list[float],
                           seed: int = 0) -> dict[float, np.ndarray]:
    """Per fraction a stratified subset of `pool` (sorted indices); smaller sets nest in larger.

    Each class's pool samples are shuffled once and every fraction takes a prefix, so the sets
    nest for any list of fractions (a gain from more labels is never a luckier draw).
    """
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise UserError(f"--label-fractions values must be in (0, 1], got {f}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed + 1)
    pool_labels = np.full(labels.shape, -1, dtype=np.int64)
    pool_labels[pool] = labels[pool]
    perms = _per_class_permutations(pool_labels, rng)
    out: dict[float, np.ndarray] = {}
    for f in fractions:
        chosen = [idx[:_take_count(len(idx), f)] for idx in perms.values()]
        out[f] = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    return out


def stratified_subsample(labels: np.ndarray, max_samples: int, seed: int = 0) -> np.ndarray:
    """At most `max_samples` labelled indices with the class proportions kept (for quick runs)."""
    labels = np.asarray(labels)
    known = np.flatnonzero(labels >= 0)
    if max_samples >= len(known):
        return known
    fraction = max_samples / len(known)
    rng = np.random.default_rng(seed + 2)
    chosen = [idx[:_take_count(len(idx), fraction)]
              for idx in _per_class_permutations(labels, rng).values()]
    return np.sort(np.concatenate(chosen))


def strata(labels: np.ndarray, multi_hot: np.ndarray | None = None) -> np.ndarray:
    """Stratification key per patch: its label; for a multi-label-only patch (label -1 but some
    class set) K + its first class; -1 when the patch carries no label at all."""
    key = np.asarray(labels, dtype=np.int64).copy()
    if multi_hot is not None and len(key):
        mh = np.asarray(multi_hot).astype(bool)
        multi = (key < 0) & mh.any(axis=1)
        key[multi] = mh.shape[1] + np.argmax(mh[multi], axis=1)
    return key


# --------------------------------------------------------------------------- layout of a file
@dataclass
class Layout:
    """What a split needs to know about a patch file: labels and where each patch lies."""

    labels: np.ndarray                       # (N,) int, -1 = unknown
    multi_hot: np.ndarray | None = None      # (N, K) 0/1
    scene: np.ndarray | None = None          # (N,) scene index
    row: np.ndarray | None = None            # (N,) patch origin, pixels on the scene's grid
    col: np.ndarray | None = None
    patch_size: int = 1
    geotransform: np.ndarray | None = None   # (S, 6) per scene
    crs: np.ndarray | None = None            # (S,) per scene

    @classmethod
    def from_arrays(cls, labels: np.ndarray, multi_hot: np.ndarray | None = None) -> Layout:
        """Independent samples (no positions): split per sample."""
        return cls(np.asarray(labels, dtype=np.int64), multi_hot)

    @classmethod
    def read(cls, path: str | os.PathLike) -> Layout:
        """Labels and patch positions of a `preprocess/SCHEMA.md` file (no image data read)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such patch file (make it with hpcsrl-preprocess)")
        try:
            with h5py.File(path, "r") as f:
                n = _patch_count(f, path)
                labels = (f["label"][:].astype(np.int64) if "label" in f
                          else np.full(n, -1, np.int64))
                mh = (f["classes"][:].astype(np.uint8)
                      if "classes" in f and f["classes"].shape[1] > 0 else None)

                def opt(name: str) -> np.ndarray | None:
                    return f[name][:].astype(np.int64) if name in f else None

                gt = f.attrs.get("scene_geotransform")
                crs = f.attrs.get("scene_crs")
                return cls(labels, mh, opt("scene"), opt("row"), opt("col"),
                           int(f.attrs.get("patch_size", 1)),
                           None if gt is None else np.asarray(gt, np.float64).reshape(-1, 6),
                           None if crs is None else np.asarray(crs, np.int64).reshape(-1))
        except OSError as exc:
            raise UserError(f"{path}: not a readable HDF5 file ({exc})") from None

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        """sha256 of the labels and patch positions: another file (or another preprocessing of
        the same scenes) gets another split, a copy or a re-run with other ranks the same one."""
        h = hashlib.sha256(f"n={len(self)};p={self.patch_size}".encode())
        for a in (self.labels, self.multi_hot, self.scene, self.row, self.col, self.geotransform,
                  self.crs):
            h.update(b"|" if a is None else np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def strata(self) -> np.ndarray:
        return strata(self.labels, self.multi_hot)


def _patch_count(f: h5py.File, path: Path) -> int:
    for name in ("label", "rgb", "data_super", "data_10m", "s1"):
        if name in f:
            return int(f[name].shape[0])
    raise UserError(f"{path}: no patch datasets (label, rgb, data_*, s1): not a hpcsrl-preprocess "
                    "output")


# --------------------------------------------------------------------------- the split
@dataclass(frozen=True)
class SplitSpec:
    """How a split is drawn (recorded in split.json)."""

    seed: int = 0
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    min_groups: int = 10       # fewer scene groups than this: split by spatial blocks

    def check(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise UserError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        if not 0.0 <= self.val_fraction < 1.0 or self.test_fraction + self.val_fraction >= 1.0:
            raise UserError(f"--val-fraction must be in [0, 1) and leave a pool beside "
                            f"--test-fraction {self.test_fraction}, got {self.val_fraction}")


@dataclass
class Split:
    """Disjoint sorted file-row arrays; `guard` rows belong to no part (block neighbours)."""

    test: np.ndarray
    val: np.ndarray
    pool: np.ndarray
    guard: np.ndarray
    grouping: str
    spec: SplitSpec
    fingerprint: str
    n_patches: int
    strata: np.ndarray = field(repr=False)
    groups: int = 0
    path: str | None = None

    def digest(self) -> str:
        """Identifies the parts themselves (recorded in checkpoints)."""
        h = hashlib.sha256(self.fingerprint.encode())
        for a in (self.test, self.val, self.pool):
            h.update(b"|" + np.asarray(a, np.int64).tobytes())
        return h.hexdigest()[:16]

    def labelled(self, fractions: list[float] | tuple[float, ...]) -> dict[float, np.ndarray]:
        """Nested stratified label subsets of the pool (fractions of its labelled patches)."""
        return nested_label_fractions(self.strata, self.pool, list(fractions), self.spec.seed)

    def pretrain_rows(self, pretrain_on: str = "pool") -> np.ndarray:
        """File rows pre-training may read: the pool, or (deliberately) every patch."""
        if pretrain_on not in PRETRAIN_ON:
            raise UserError(f"--pretrain-on {pretrain_on!r}: choose one of "
                            f"{', '.join(PRETRAIN_ON)}")
        return self.pool if pretrain_on == "pool" else np.arange(self.n_patches, dtype=np.int64)

    def record(self, pretrain_on: str | None = None) -> dict[str, Any]:
        """A compact description for checkpoints and reports (no index lists)."""
        rec = {"path": self.path, "digest": self.digest(), "fingerprint": self.fingerprint,
               "grouping": self.grouping, "seed": self.spec.seed, "n_test": len(self.test),
               "n_val": len(self.val), "n_pool": len(self.pool), "n_guard": len(self.guard)}
        if pretrain_on is not None:
            rec["pretrain_on"] = pretrain_on
        return rec

    def to_json(self, fractions: tuple[float, ...] = (0.1, 0.2, 0.5)) -> dict[str, Any]:
        return {"format": SPLIT_FORMAT, "fingerprint": self.fingerprint,
                "n_patches": self.n_patches, "grouping": self.grouping, "groups": self.groups,
                "spec": asdict(self.spec), "digest": self.digest(),
                "counts": {"test": len(self.test), "val": len(self.val),
                           "pool": len(self.pool), "guard": len(self.guard)},
                "test": self.test.tolist(), "val": self.val.tolist(),
                "pool": self.pool.tolist(), "guard": self.guard.tolist(),
                "labelled": {f"{f:g}": idx.tolist()
                             for f, idx in self.labelled(fractions).items()}}

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_json())
        self.path = str(Path(path).resolve())


def make_split(layout: Layout, spec: SplitSpec = SplitSpec()) -> Split:
    """Draw the three parts (see the module docstring for the grouping rules)."""
    spec.check()
    n = len(layout)
    keys = layout.strata()
    labelled = keys >= 0
    empty = np.zeros(0, np.int64)
    if not labelled.any():  # nothing to evaluate on: everything may be pre-trained on
        return Split(empty, empty, np.arange(n, dtype=np.int64), empty, "unlabelled", spec,
                     layout.fingerprint(), n, keys)
    scene = layout.scene
    if scene is None or layout.row is None or layout.col is None \
            or len(np.unique(scene)) == n:
        test, val, pool = _stratified_parts(keys, spec)
        return Split(test, val, pool, empty, "chip", spec, layout.fingerprint(), n, keys, n)
    comp = _scene_components(layout)
    groups = comp[scene]
    grouping = "scene"
    if len(np.unique(groups)) < spec.min_groups:
        groups, grouping = _blocks(layout, comp, spec.min_groups), "block"
    test, val, pool = _grouped_parts(groups, labelled, spec)
    guard = empty
    if grouping == "block":
        near_test = _touching(layout, comp, test)
        near_val = _touching(layout, comp, val)
        guard = np.union1d(np.intersect1d(near_test, np.union1d(val, pool)),
                           np.intersect1d(near_val, pool))
        val, pool = np.setdiff1d(val, guard), np.setdiff1d(pool, guard)
    return Split(test, val, pool, guard, grouping, spec, layout.fingerprint(), n, keys,
                 len(np.unique(groups)))


def _stratified_parts(keys: np.ndarray, spec: SplitSpec
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class: test first, validation next, the rest (at least one) to the pool; patches
    without any label go to the pool (pre-training may read them, nobody evaluates on them)."""
    rng = np.random.default_rng(spec.seed)
    test, val, pool = [], [], [np.flatnonzero(keys < 0)]
    for c, idx in _per_class_permutations(keys, rng).items():
        if len(idx) < 2:
            raise UserError(f"class {c} has only {len(idx)} labelled patch(es); a split needs at "
                            "least 2 per class (add data or drop the class)")
        n_test = min(len(idx) - 1, _take_count(len(idx), spec.test_fraction))
        n_val = min(len(idx) - 1 - n_test, int(round(spec.val_fraction * len(idx))))
        test.append(idx[:n_test])
        val.append(idx[n_test:n_test + n_val])
        pool.append(idx[n_test + n_val:])
    return tuple(np.sort(np.concatenate(p)).astype(np.int64) for p in (test, val, pool))


def _grouped_parts(groups: np.ndarray, labelled: np.ndarray, spec: SplitSpec
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whole groups in a seeded random order: test until it holds `test_fraction` of the labelled
    patches, then validation likewise, the rest to the pool."""
    uniq, inverse = np.unique(groups, return_inverse=True)
    weight = np.bincount(inverse, weights=labelled.astype(np.float64), minlength=len(uniq))
    order = np.random.default_rng(spec.seed).permutation(len(uniq))
    total = weight.sum()
    side = np.full(len(uniq), 2, np.int64)        # 0 test, 1 val, 2 pool
    filled = [0.0, 0.0]
    targets = [spec.test_fraction * total, spec.val_fraction * total]
    for g in order:
        for s in (0, 1):
            if filled[s] < targets[s]:
                side[g], filled[s] = s, filled[s] + weight[g]
                break
    part = side[inverse]
    if not (part == 2).any() or not (part == 0).any():
        raise UserError(f"only {len(uniq)} spatial group(s): too few for a test split and a pool; "
                        "use more scenes or a smaller patch size")
    return tuple(np.flatnonzero(part == s).astype(np.int64) for s in (0, 1, 2))


def _georeferenced(layout: Layout) -> bool:
    gt = layout.geotransform
    if gt is None or layout.scene is None or len(gt) <= int(layout.scene.max()):
        return False
    return not np.all(gt == np.asarray(_UNGEOREFERENCED))


def _origins(layout: Layout) -> tuple[np.ndarray, np.ndarray, float]:
    """Patch origins in map units (pixels when not georeferenced) and the patch extent."""
    row, col = layout.row.astype(np.float64), layout.col.astype(np.float64)
    if not _georeferenced(layout):
        return col, row, float(layout.patch_size)
    gt = layout.geotransform[layout.scene]
    x = gt[:, 0] + col * gt[:, 1] + row * gt[:, 2]
    y = gt[:, 3] + col * gt[:, 4] + row * gt[:, 5]
    return x, y, float(layout.patch_size * np.abs(layout.geotransform[:, 1]).max())


def _scene_components(layout: Layout) -> np.ndarray:
    """Per scene a component id: georeferenced scenes in one CRS whose patch areas overlap or
    touch (the same place at two dates, adjacent tiles) share one; otherwise each its own."""
    n_scenes = int(layout.scene.max()) + 1
    parent = np.arange(n_scenes)
    if not _georeferenced(layout):
        return parent
    x, y, ext = _origins(layout)
    crs = layout.crs if layout.crs is not None else np.zeros(n_scenes, np.int64)
    box = np.full((n_scenes, 4), np.nan)  # origin extremes of each scene's patches
    for s in np.unique(layout.scene):
        sel = layout.scene == s
        box[s] = (x[sel].min(), x[sel].max(), y[sel].min(), y[sel].max())

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    present = [s for s in range(n_scenes) if not np.isnan(box[s, 0])]
    for i, a in enumerate(present):
        for b in present[i + 1:]:
            if (crs[a] == crs[b] and box[a, 0] <= box[b, 1] + ext and box[b, 0] <= box[a, 1] + ext
                    and box[a, 2] <= box[b, 3] + ext and box[b, 2] <= box[a, 3] + ext):
                parent[find(b)] = find(a)
    return np.array([find(i) for i in range(n_scenes)])


def _blocks(layout: Layout, comp: np.ndarray, min_groups: int) -> np.ndarray:
    """Group ids of square blocks of patches (in map units, within each scene component), as
    large as possible while giving at least `min_groups` blocks."""
    x, y, ext = _origins(layout)
    c = comp[layout.scene]
    side = 64
    while True:
        size = side * ext
        keys = np.stack([c, np.floor(x / size), np.floor(y / size)], axis=1)
        groups = np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1)
        if side == 1 or groups.max() + 1 >= min_groups:
            return groups
        side //= 2


def _touching(layout: Layout, comp: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows of other patches (same scene component) whose footprint touches or overlaps one of
    `rows`: origins within one patch extent on both axes."""
    if len(rows) == 0:
        return np.zeros(0, np.int64)
    x, y, ext = _origins(layout)
    c = comp[layout.scene]
    cx, cy = np.floor(x / ext).astype(np.int64), np.floor(y / ext).astype(np.int64)
    by_cell: dict[tuple[int, int, int], list[int]] = {}
    for r in rows.tolist():
        by_cell.setdefault((int(c[r]), int(cx[r]), int(cy[r])), []).append(r)
    near = []
    for i in range(len(x)):
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for r in by_cell.get((int(c[i]), int(cx[i]) + dx, int(cy[i]) + dy), ()):
                    if abs(x[r] - x[i]) <= ext + 1e-9 and abs(y[r] - y[i]) <= ext + 1e-9:
                        near.append(i)
                        break
    return np.setdiff1d(np.asarray(near, np.int64), rows)


# --------------------------------------------------------------------------- split.json
def load_split(path: str | os.PathLike, layout: Layout) -> Split:
    """A recorded split; refused when it was drawn for another file."""
    path = Path(path)
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable split.json ({exc})") from None
    if not isinstance(rec, dict) or rec.get("format") != SPLIT_FORMAT:
        raise UserError(f"{path}: not a split.json of this hpcsrl version (format "
                        f"{rec.get('format') if isinstance(rec, dict) else '?'}); "
                        "remove it to draw a new one")
    if rec.get("fingerprint") != layout.fingerprint():
        raise UserError(f"{path} was drawn for another patch file (labels/positions differ): "
                        "pass the split of this --data, or a new --split path to draw one")
    spec = SplitSpec(**rec["spec"])
    parts = {k: np.asarray(rec[k], dtype=np.int64) for k in ("test", "val", "pool", "guard")}
    split = Split(**parts, grouping=rec["grouping"], spec=spec, fingerprint=rec["fingerprint"],
                  n_patches=int(rec["n_patches"]), strata=layout.strata(),
                  groups=int(rec.get("groups", 0)), path=str(path.resolve()))
    if split.digest() != rec.get("digest"):
        raise UserError(f"{path}: its parts do not match its digest (edited by hand?); remove it "
                        "to draw a new one")
    return split


def resolve_split(path: str | os.PathLike, layout: Layout, given: dict[str, Any] | None = None,
                  write: bool = True) -> Split:
    """The split recorded at `path`, or a new one drawn with `given` (SplitSpec fields the user
    set; the rest default) and written there. A recorded split whose spec contradicts `given` is
    refused. `write=False` on all but one rank: every rank draws the same split."""
    path = Path(path)
    given = {k: v for k, v in (given or {}).items() if v is not None}
    if path.is_file():
        split = load_split(path, layout)
        have = asdict(split.spec)
        clash = {k: v for k, v in given.items() if have.get(k) != v}
        if clash:
            said = ", ".join(f"{k} {v} (recorded {have.get(k)})" for k, v in clash.items())
            raise UserError(f"{path} was drawn with other options: {said}; drop those options "
                            "to reuse it, or pass another --split path to draw a new split")
        return split
    split = make_split(layout, SplitSpec(**given))
    if write:
        split.save(path)
    else:
        split.path = str(path.resolve())
    return split


# --------------------------------------------------------------------------- reading one part
class SplitPatches(PatchDataset):
    """The patches a split lets pre-training read (the pool, or all with `pretrain_on="all"`).

    Its fingerprint carries the split's record, so the checkpoint says what was trained on and
    --resume refuses another split.
    """

    def __init__(self, path: str | os.PathLike, bands: str, split: Split,
                 pretrain_on: str = "pool") -> None:
        super().__init__(path, bands=bands, indices=split.pretrain_rows(pretrain_on))
        self.split_record = split.record(pretrain_on)

    def fingerprint(self) -> dict[str, object]:
        return {**super().fingerprint(), "split": self.split_record}


def pretraining_patches(data: str | os.PathLike, bands: str, path: str | os.PathLike,
                        given: dict[str, Any] | None = None, pretrain_on: str = "pool",
                        write: bool = True) -> SplitPatches:
    """What `hpcsrl pretrain` and `hpcsrl dhp` read: the split at `path` (drawn and written
    there when absent, see `resolve_split`) opened as its pool, or every patch with
    `pretrain_on="all"`. An unwritable split location is a UserError naming it."""
    path = Path(path)
    try:
        split = resolve_split(path, Layout.read(data), given, write=write)
    except OSError as exc:
        raise UserError(f"{path.parent}: cannot write {path.name} there ({exc.strerror}): "
                        "choose a writable --out (or --split)") from None
    return SplitPatches(data, bands, split, pretrain_on)


def pretraining_message(record: dict[str, Any], n_read: int) -> str:
    """One log line saying which part of which split a pre-training reads (`record`: a
    `SplitPatches.split_record`)."""
    part = ("ALL patches, test included (--pretrain-on all)" if record["pretrain_on"] == "all"
            else "the pool only (no test or validation patch)")
    total = record["n_test"] + record["n_val"] + record["n_pool"] + record["n_guard"]
    return (f"split {record['path']} ({record['grouping']}, digest {record['digest']}): "
            f"pre-training reads {part}, {n_read} of {total} patches")
