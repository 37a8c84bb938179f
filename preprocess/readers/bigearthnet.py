"""BigEarthNet v1 patch folders (Sentinel-2, optionally with the co-located Sentinel-1 patches).

S2 patch: `<patch>/<patch>_B01.tif ... _B12.tif, _B8A.tif` (120/60/20 px at 10/20/60 m) and
`<patch>_labels_metadata.json` whose "labels" are CORINE land-cover names. S1 patch:
`<s1patch>/<s1patch>_VV.tif, _VH.tif` and a JSON naming its `corresponding_s2_patch`. Folders may
sit anywhere below the input folder (e.g. BigEarthNet-S2/ and BigEarthNet-S1/ side by side).

Classes: by default the fixed 43-class CORINE level-3 list that BigEarthNet v1 labels use, in its
usual order, so K and class indices do not depend on which patches a subset holds
(`classes="union"` gives the sorted union of the labels found instead).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from hpcsrl.data import bands as B
from hpcsrl.errors import UserError
from preprocess.readers.raster import BadScene, collect, require_scenes, s2_scene, walk
from preprocess.scene import SceneSet

FMT = "bigearthnet"
LABELS_SUFFIX = "_labels_metadata.json"

CORINE_43: tuple[str, ...] = (
    "Continuous urban fabric",
    "Discontinuous urban fabric",
    "Industrial or commercial units",
    "Road and rail networks and associated land",
    "Port areas",
    "Airports",
    "Mineral extraction sites",
    "Dump sites",
    "Construction sites",
    "Green urban areas",
    "Sport and leisure facilities",
    "Non-irrigated arable land",
    "Permanently irrigated land",
    "Rice fields",
    "Vineyards",
    "Fruit trees and berry plantations",
    "Olive groves",
    "Pastures",
    "Annual crops associated with permanent crops",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland",
    "Moors and heathland",
    "Sclerophyllous vegetation",
    "Transitional woodland/shrub",
    "Beaches, dunes, sands",
    "Bare rock",
    "Sparsely vegetated areas",
    "Burnt areas",
    "Inland marshes",
    "Peatbogs",
    "Salt marshes",
    "Salines",
    "Intertidal flats",
    "Water courses",
    "Water bodies",
    "Coastal lagoons",
    "Estuaries",
    "Sea and ocean",
)


@dataclass(frozen=True)
class Patch:
    folder: Path
    name: str


def find_patches(root: Path) -> tuple[list[Patch], list[Patch]]:
    """(S2 patch folders, S1 patch folders) anywhere below `root`, each sorted by name."""
    s2, s1 = [], []
    for folder, dirnames, filenames in walk(root):
        files = set(filenames)
        name = folder.name
        if f"{name}_B02.tif" in files or f"{name}{LABELS_SUFFIX}" in files and any(
                f.startswith(f"{name}_B") for f in files):
            s2.append(Patch(folder, name))
            dirnames.clear()
        elif f"{name}_VV.tif" in files or f"{name}_VH.tif" in files:
            s1.append(Patch(folder, name))
            dirnames.clear()
    return sorted(s2, key=lambda p: p.name), sorted(s1, key=lambda p: p.name)


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadScene(path, "labels metadata JSON is missing") from None
    except (OSError, ValueError) as exc:
        raise BadScene(path, f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise BadScene(path, "expected a JSON object")
    return obj


def s1_partners(s1_patches: list[Patch]) -> tuple[dict[str, Patch], list[tuple[str, str]]]:
    """S2 patch name -> its S1 patch (from the S1 JSON); unreadable S1 JSONs are reported."""
    partners: dict[str, Patch] = {}
    problems: list[tuple[str, str]] = []
    for p in s1_patches:
        meta = p.folder / f"{p.name}{LABELS_SUFFIX}"
        try:
            s2_name = read_json(meta).get("corresponding_s2_patch")
        except BadScene as bad:
            problems.append((bad.path, bad.reason))
            continue
        if isinstance(s2_name, str) and s2_name:
            partners[s2_name] = p
    return partners, problems


def read(root: Path, *, skip_bad: bool = False, exclude: frozenset[str] = frozenset(),
         progress: bool = False, classes: str = "corine43") -> SceneSet:
    """All BigEarthNet v1 patches under `root`, with S1 when the set has S1 patches."""
    if classes not in ("corine43", "union"):
        raise UserError(f"bigearthnet classes must be 'corine43' or 'union', not {classes!r}")
    s2_patches, s1_patches = find_patches(root)
    partners, s1_problems = s1_partners(s1_patches)
    if s1_problems and not skip_bad:
        path, reason = s1_problems[0]
        raise UserError(f"{path}: {reason} (fix or remove it, or use --skip-bad)")
    kept = [p for p in s2_patches if p.name not in exclude
            and not (p.name in partners and partners[p.name].name in exclude)]
    with_s1 = bool(s1_patches)
    labels: dict[str, list[str]] = {}

    def build(p: Patch):
        meta = p.folder / f"{p.name}{LABELS_SUFFIX}"
        names = read_json(meta).get("labels")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BadScene(meta, 'no "labels" list of strings')
        unknown = [n for n in names if n not in CORINE_43]
        if classes == "corine43" and unknown:
            raise BadScene(meta, f"label(s) not in the 43-class CORINE list: {', '.join(unknown)}")
        files = {b: (str(p.folder / f"{p.name}_{b}.tif"), 1) for b in B.S2_BANDS
                 if (p.folder / f"{p.name}_{b}.tif").is_file()}
        s1_files = {}
        if with_s1:
            partner = partners.get(p.name)
            if partner is None:
                raise BadScene(p.folder, "no Sentinel-1 patch names this patch as its "
                                         "corresponding_s2_patch (other patches have one)")
            for pol in B.S1_BANDS:
                f = partner.folder / f"{partner.name}_{pol}.tif"
                if not f.is_file():
                    raise BadScene(partner.folder, f"missing Sentinel-1 band {pol} ({f.name})")
                s1_files[pol] = str(f)
        scene = s2_scene(p.name, files, B.S2_BANDS, s1_files=s1_files, folder=str(p.folder))
        labels[p.name] = names
        return scene

    scenes, skipped = collect(kept, build, skip_bad, progress, desc="bigearthnet")
    skipped = sorted(skipped + s1_problems)
    require_scenes(scenes, skipped, root, FMT,
                   "expected <patch>/<patch>_B02.tif and <patch>_labels_metadata.json")
    # Class indices last: with classes="union" the list depends on the patches that were kept.
    class_names = CORINE_43 if classes == "corine43" else tuple(
        sorted({n for s in scenes for n in labels[s.name]}))
    index = {n: i for i, n in enumerate(class_names)}
    scenes = [replace(s, scene_classes=tuple(sorted({index[n] for n in labels[s.name]})))
              for s in scenes]
    return SceneSet(scenes=scenes, class_names=class_names, fmt=FMT, s2_bands=B.S2_BANDS,
                    s1_bands=B.S1_BANDS if with_s1 else (), skipped=skipped)
