"""`hpcsrl synth`: write a synthetic Sentinel-1/-2 scene set (GeoTIFFs) for demos and tests."""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from hpcsrl.log import get_logger


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (one sub-folder per scene)")
    p.add_argument("--scenes", type=int, default=8, help="number of scenes (default 8)")
    p.add_argument("--size", type=int, default=1200,
                   help="median scene side in 10 m pixels (default 1200)")
    p.add_argument("--size-spread", type=float, default=0.8,
                   help="log-normal sigma of the scene side; 0 = all scenes the same size "
                        "(default 0.8)")
    p.add_argument("--classes", type=int, default=6,
                   help="land-cover classes, 1-8: water forest cropland urban bare_soil "
                        "grassland wetland shrubland, first K used (default 6)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--layout", choices=("per-band", "per-resolution"), default="per-band",
                   help="one GeoTIFF per band (BigEarthNet style) or per resolution "
                        "(<scene>_R10m.tif ...)")
    p.add_argument("--no-s1", dest="s1", action="store_false",
                   help="do not write Sentinel-1 VV/VH rasters")
    p.add_argument("--cloud-fraction", type=float, default=0.1,
                   help="mean cloud cover per scene (default 0.1)")
    p.add_argument("--nodata-fraction", type=float, default=0.05,
                   help="mean no-data share per scene (default 0.05)")
    p.add_argument("--compress", choices=("none", "deflate", "lzw"), default="none",
                   help="GeoTIFF compression (default none: fastest)")
    p.add_argument("--force", action="store_true",
                   help="replace scenes of an earlier run made with other parameters")


def run(args: argparse.Namespace) -> int:
    from preprocess.synth import SynthConfig, generate

    cfg = SynthConfig(scenes=args.scenes, size=args.size, size_spread=args.size_spread,
                      classes=args.classes, seed=args.seed, layout=args.layout, s1=args.s1,
                      cloud_fraction=args.cloud_fraction, nodata_fraction=args.nodata_fraction,
                      compress=args.compress)
    log = get_logger("hpcsrl.synth")
    t0 = time.perf_counter()
    result = generate(args.out, cfg, force=args.force,
                      command=shlex.join(["hpcsrl", *sys.argv[1:]]), progress=True)
    pixels = sum(e["width"] * e["height"] for e in result.scenes)
    sides = sorted(max(e["width"], e["height"]) for e in result.scenes)
    log.info("wrote %d scene(s) to %s in %.1f s: %.1f Mpx at 10 m, largest side %d px, "
             "smallest %d px", len(result.scenes), args.out, time.perf_counter() - t0,
             pixels / 1e6, sides[-1], sides[0])
    return 0
