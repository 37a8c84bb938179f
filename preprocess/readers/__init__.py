"""Input readers: turn a folder of scenes in any supported layout into a sorted `SceneSet`.

`discover(input_dir, fmt="auto")` is the one entry point the preprocessing driver uses. Formats:
`synthetic` (the `hpcsrl synth` layout; also Major-TOM / SSL4EO-style per-band folders, alias
`majortom`), `bigearthnet` (v1 patch folders, optional S1), `safe` (Sentinel-2 L2A .SAFE), `s1`
(Sentinel-1 GeoTIFFs / GRD measurements) and `chips` (class-named folders of image chips).
Readers validate cheaply (headers + the last block of every band) and either stop with a
`UserError` naming the file or, with `skip_bad`, record it in `SceneSet.skipped`.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from hpcsrl.errors import UserError
from hpcsrl.log import get_logger
from preprocess.scene import SceneSet

FORMATS = ("synthetic", "majortom", "bigearthnet", "safe", "s1", "chips")
_DETECT_MAX_FILES = 20_000  # auto-detection looks at no more files than this
_DETECT_MAX_DEPTH = 5


def _reader(fmt: str) -> Callable[..., SceneSet]:
    if fmt in ("synthetic", "majortom"):  # one reader; the SceneSet records which layout it was
        from preprocess.readers import synthetic as mod

        return functools.partial(mod.read, fmt=fmt)
    elif fmt == "bigearthnet":
        from preprocess.readers import bigearthnet as mod
    elif fmt == "safe":
        from preprocess.readers import safe as mod
    elif fmt == "s1":
        from preprocess.readers import s1 as mod
    elif fmt == "chips":
        from preprocess.readers import chips as mod
    else:
        raise UserError(f"unknown input format {fmt!r}: choose auto or one of {', '.join(FORMATS)}")
    return mod.read


def read_name_list(paths: Iterable[str | os.PathLike]) -> frozenset[str]:
    """Names from exclusion lists (BigEarthNet ships CSVs of cloudy / snowy patches).

    One name per line, the first comma-separated field counts; blank lines and '#' comments are
    ignored; a header line is harmless (it matches no scene).
    """
    names: set[str] = set()
    for p in paths:
        p = Path(p)
        try:
            text = p.read_text()
        except OSError as exc:
            raise UserError(f"exclusion list {p}: cannot read it ({exc.strerror or exc})") from exc
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                names.add(line.split(",", 1)[0].strip().strip('"'))
    return frozenset(names)


def _summary(root: Path) -> str:
    """What a folder holds, for the 'unknown format' message."""
    exts: Counter[str] = Counter()
    n_dirs = 0
    for i, (_, dirnames, filenames) in enumerate(os.walk(root)):
        if i > 2000:
            break
        n_dirs += len(dirnames)
        exts.update(Path(f).suffix.lower() or "(no extension)" for f in filenames)
    top = ", ".join(f"{n} {e}" for e, n in exts.most_common(6)) or "no files"
    return f"{n_dirs} folder(s); files: {top}"


def require_folder(root: str | os.PathLike) -> Path:
    """The input as a folder; a file or a missing path gets a message saying which it is."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"input {root} is a file; expected a folder of scenes (one of the "
                        f"layouts {', '.join(FORMATS)})")
    if not root.is_dir():
        raise UserError(f"input folder {root} does not exist")
    return root


def detect_format(root: str | os.PathLike) -> str:
    """Guess the layout from a bounded look at the folder (names only, no raster opened)."""
    from preprocess.readers.chips import IMAGE_EXT
    from preprocess.readers.raster import walk
    from preprocess.readers.s1 import POL
    from preprocess.readers.synthetic import BAND_FILE, MAJORTOM_CELL

    root = require_folder(root)
    top = sorted(os.scandir(root), key=lambda e: e.name)
    if not top:
        raise UserError(f"input folder {root} is empty")
    products = [root] if root.suffix.upper() == ".SAFE" else [
        Path(e.path) for e in top if e.is_dir() and e.name.upper().endswith(".SAFE")]
    if products:
        p = products[0]
        if (p / "MTD_MSIL2A.xml").exists():
            return "safe"
        if (p / "measurement").is_dir():
            return "s1"
        raise UserError(f"{p}: a .SAFE folder that is neither a Sentinel-2 L2A product "
                        "(MTD_MSIL2A.xml) nor a Sentinel-1 product (measurement/)")
    manifest = root / "manifest.json"
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text()).get("format") == "hpcsrl-synth":
                return "synthetic"
        except (OSError, ValueError, AttributeError):
            pass
    seen = 0
    has_pol = False
    for folder, _, filenames in walk(root, _DETECT_MAX_DEPTH):
        band_hits = [f for f in filenames if (m := BAND_FILE.match(f))
                     and m.group("key").upper() not in ("VV", "VH", "SCL", "LABEL")]
        if band_hits:
            if any(f.endswith("_labels_metadata.json") for f in filenames):
                return "bigearthnet"
            if any(MAJORTOM_CELL.match(part) for part in folder.parts):
                return "majortom"
            return "synthetic"
        has_pol = has_pol or any(POL.search(f) and f.lower().endswith((".tif", ".tiff"))
                                 for f in filenames)
        seen += len(filenames)
        if seen > _DETECT_MAX_FILES:
            break
    for e in top:
        if e.is_dir() and not e.name.startswith("."):
            with os.scandir(e.path) as it:
                if any(f.is_file() and f.name.lower().endswith(IMAGE_EXT) for f in it):
                    return "chips"
    if has_pol:
        return "s1"
    raise UserError(f"{root}: cannot tell the input format ({_summary(root)}); expected one of "
                    f"{', '.join(FORMATS)} — pass the format explicitly if it is one of them")


def probe_candidates(root: str | os.PathLike, fmt: str = "auto"
                     ) -> tuple[list[str], dict[str, str]]:
    """The raster files the reader of `root` will `probe`, so that several ranks can probe them
    ahead (`raster.probe_many`, `raster.prefetched`), and the GDAL configuration the reader
    probes them under. Empty for layouts whose reader opens its files otherwise (SAFE, S1)."""
    root = require_folder(root)
    if fmt == "auto":
        fmt = detect_format(root)
    if fmt in ("synthetic", "majortom", "bigearthnet"):
        from preprocess.readers.synthetic import scan_groups

        files = []
        for g in scan_groups(root):
            files += [*g.bands.values(), *g.per_res.values(), *g.s1.values()]
            files += [f for f in (g.scl, g.label) if f]
        return files, {}
    if fmt == "chips":
        from preprocess.readers.chips import READ_CONFIG, find_chips

        return [str(path) for _, path in find_chips(root)], dict(READ_CONFIG)
    return [], {}


def discover(input_dir: str | os.PathLike, fmt: str = "auto", skip_bad: bool = False,
             exclude: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
             progress: bool = False, **options) -> SceneSet:
    """All scenes of `input_dir` in a deterministic order (sorted by scene name).

    `exclude`: exclusion list file(s) of scene / patch names to drop (BigEarthNet style).
    `options` go to the reader (e.g. `classes="union"` for bigearthnet).
    """
    root = require_folder(input_dir)
    if fmt == "auto":
        fmt = detect_format(root)
    read = _reader(fmt)
    if exclude is None:
        names: frozenset[str] = frozenset()
    else:
        files = [exclude] if isinstance(exclude, (str, os.PathLike)) else list(exclude)
        names = read_name_list(files)
    try:
        sceneset = read(root, skip_bad=skip_bad, exclude=names, progress=progress, **options)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise UserError(f"format {fmt}: unsupported option(s) {sorted(options)}") from exc
        raise
    dupes = [n for n, c in Counter(s.name for s in sceneset.scenes).items() if c > 1]
    if dupes:
        raise UserError(f"{root}: scene names must be unique; duplicated: {', '.join(dupes[:5])}")
    log = get_logger("hpcsrl.readers")
    log.info("%s: %d %s scene(s)%s%s", root, len(sceneset.scenes), sceneset.fmt,
             f", {len(names)} name(s) in exclusion lists" if names else "",
             f", {len(sceneset.skipped)} skipped as bad" if sceneset.skipped else "")
    return sceneset
