"""`hpcsrl-preprocess`: tile Sentinel scenes into one HDF5 of patches with N MPI ranks.

Phases, each ending in an agreement of all ranks (so a failure anywhere stops everyone cleanly):
1. rank 0 discovers the scenes, counts patches, computes the assignment, and broadcasts the plan;
2. every rank tiles its ranges into its own shard (or reuses a complete one from an earlier run),
   posting progress to rank 0, which draws one bar for all ranks and relays a stop on error;
3. all ranks gather their results; rank 0 writes and validates the master file, prints a summary.
Runs under mpirun, srun --mpi=pmix, or alone (COMM_WORLD of one rank).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcsrl.errors import UserError
from hpcsrl.log import get_logger
from preprocess import balance, writer
from preprocess.readers import FORMATS
from preprocess.readers.raster import prefetched
from preprocess.scene import Scene, SceneSet
from preprocess.tiling import FilterOptions, Layout, layout_for, scene_problem, tile_range

PROG = "hpcsrl-preprocess"
TAG_PROGRESS, TAG_STOP = 71, 72
FAULT_ENV, FAULT_RANK_ENV = "HPCSRL_FAULT_AFTER_PATCHES", "HPCSRL_FAULT_RANK"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Tile Sentinel-1/-2 scenes into one HDF5 file of patches (preprocess/SCHEMA.md)"
        " with MPI ranks: mpirun -np N hpcsrl-preprocess --input DIR --output FILE.h5. Each rank "
        "writes FILE.h5.shards/rank-RRRR.h5; FILE.h5 maps them as virtual datasets and appears "
        "only once complete and validated. Re-running after a killed job reuses complete shards.",
        epilog="Exit status: 0 done, 2 bad input or options (one message naming the file).")
    p.add_argument("--input", required=True, type=Path, help="folder with the scenes")
    p.add_argument("--output", required=True, type=Path, help="HDF5 file to create (.h5)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --output file (without it, an existing file is "
                   "refused and left untouched)")
    p.add_argument("--patch-size", type=int, default=120,
                   help="patch side at 10 m in pixels; a multiple of 6 for Sentinel-2 "
                   "(default: 120, as BigEarthNet)")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS),
                   help="input layout (default: auto-detect); see preprocess/readers")
    p.add_argument("--max-cloud", type=float, default=0.1,
                   help="drop patches whose cloud/shadow/cirrus fraction (SCL 3, 8, 9, 10) "
                   "exceeds this (default: 0.1)")
    p.add_argument("--max-nodata", type=float, default=0.0,
                   help="drop patches whose no-data fraction (SCL 0, or all bands == nodata) "
                   "exceeds this (default: 0.0)")
    p.add_argument("--min-class-fraction", type=float, default=0.05,
                   help="a class enters a patch's multi-hot label when it covers at least this "
                   "fraction of its labelled pixels (default: 0.05)")
    p.add_argument("--exclude", default="",
                   help="comma-separated files listing scene/patch names to leave out, one per "
                   "line (first CSV column), e.g. BigEarthNet's patches_with_seasonal_snow.csv")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable or inconsistent scenes (listed in the summary and the "
                   "file's `skipped` attribute) instead of stopping")
    p.add_argument("--assignment", choices=balance.STRATEGIES, default="split",
                   help="work split over ranks: split (contiguous patch ranges, balanced to one "
                   "patch; default), greedy (whole scenes, largest first) or round-robin")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stall-timeout", type=float, default=900.0,
                   help="seconds rank 0 waits without news from a rank before aborting the job "
                   "(a rank died or hangs; default: 900)")
    return p


@dataclass
class Plan:
    """What rank 0 decided and broadcast: scenes, layout, assignment, fingerprints."""

    sceneset: SceneSet
    scenes: list[Scene]
    layout: Layout
    counts: list[int]
    assignment: balance.Assignment
    input_fp: str
    options: dict[str, Any]
    skipped: list[tuple[str, str]]


@dataclass
class RankResult:
    """One rank's outcome, gathered by rank 0."""

    rank: int
    error: str | None = None
    ranges: list[tuple[int, int, int]] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    stats: list[dict] = field(default_factory=list)
    bad: dict[int, str] = field(default_factory=dict)
    seen: int = 0
    dropped_cloud: int = 0
    dropped_nodata: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    reused: bool = False
    stopped: list[int] = field(default_factory=list)  # rank 0 only: ranks sent a stop


# --- phase 1: plan (rank 0) --------------------------------------------------------------------

def describe_inputs(scenes: list[Scene]) -> str:
    """Fingerprint of what the scenes are made of (paths, sizes, mtimes, geometry)."""
    desc = []
    for s in scenes:
        srcs = [*s.s2.items(), *s.s1.items(), ("SCL", s.scl), ("labels", s.label_raster)]
        desc.append([s.name, s.width, s.height, list(s.geotransform), s.nodata,
                     list(s.scene_classes or ()),
                     [[k, v.path, v.band_index, v.resolution_m, v.offset, v.scale,
                       writer.file_fingerprint(v.path)] for k, v in srcs if v is not None]])
    return writer.fingerprint(desc)


def make_plan(args: argparse.Namespace, n_ranks: int, discover=None) -> Plan:
    """Discover, filter and count scenes and assign them to ranks (rank 0 only)."""
    for name in ("max_cloud", "max_nodata", "min_class_fraction"):
        v = getattr(args, name)
        if not 0.0 <= v <= 1.0:
            raise UserError(f"--{name.replace('_', '-')} {v}: must be a fraction in [0, 1]")
    if args.input.exists() and not args.input.is_dir():
        raise UserError(f"--input {args.input}: is a file; give the folder that holds the "
                        "scenes (e.g. the --out folder of hpcsrl synth)")
    if not args.input.is_dir():
        raise UserError(f"--input {args.input}: no such folder")
    if args.output.is_dir():
        raise UserError(f"--output {args.output}: is a folder; give a file name such as out.h5")
    if (args.output.exists() or args.output.is_symlink()) and not args.force:
        raise UserError(f"--output {args.output}: already exists; pass --force to replace it")
    try:  # like `mkdir -p`: batch scripts often name a fresh results folder
        args.output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--output {args.output}: cannot create folder {args.output.parent} "
                        f"({exc.strerror}); choose a writable location") from None
    if discover is None:
        from preprocess.readers import discover
    lists = lists_attr(args.exclude)
    sceneset: SceneSet = discover(args.input, fmt=args.format, skip_bad=args.skip_bad,
                                  exclude=lists or None)
    scenes = list(sceneset.scenes)
    if not scenes:
        raise UserError(f"--input {args.input}: no scenes found")
    layout = layout_for(sceneset, args.patch_size)
    skipped = list(sceneset.skipped)
    complete = []
    for s in scenes:
        problem = scene_problem(s, layout)
        if problem and not args.skip_bad:
            raise UserError(f"{problem} (use --skip-bad to leave it out)")
        if problem:
            skipped.append((s.name, problem))
        else:
            complete.append(s)
    scenes = complete
    counts = [s.n_patches(args.patch_size) for s in scenes]
    if sum(counts) == 0:
        raise UserError(f"--input {args.input}: no scene is at least {args.patch_size}x"
                        f"{args.patch_size} pixels; lower --patch-size")
    options = {"patch_size": args.patch_size, "max_cloud": args.max_cloud,
               "max_nodata": args.max_nodata, "min_class_fraction": args.min_class_fraction,
               "layout": [layout.optical, list(layout.s1_bands)],
               "classes": list(sceneset.class_names), "format_version": writer.FORMAT_VERSION}
    assignment = balance.assign(counts, n_ranks, args.assignment)
    return Plan(sceneset, scenes, layout, counts, assignment, describe_inputs(scenes), options,
                skipped)


# --- phase 2: tile (every rank) ----------------------------------------------------------------

class Progress:
    """Rank 0 draws one bar for all ranks from counts the others post with non-blocking sends;
    it also relays a stop to every rank when one fails."""

    def __init__(self, comm, total: int, enabled: bool, stall_timeout: float) -> None:
        self.comm, self.rank, self.size = comm, comm.Get_rank(), comm.Get_size()
        self.seen = [0] * self.size
        self.finished = [False] * self.size
        self.heard = time.monotonic()
        self.stopping = False
        self.stopped: list[int] = []
        self.got_stop = False
        self.last = 0
        self.stall_timeout = stall_timeout
        self._requests: list = []
        self._last_post = 0.0
        self.bar = None
        if self.rank == 0 and enabled:
            from hpcsrl.progress import progress_bar
            self.bar = progress_bar(total=total, unit="patch",
                                    desc=f"tiling on {self.size} rank(s)", dynamic_ncols=True)

    def update(self, seen: int, final: bool = False, failed: bool = False) -> None:
        """Report this rank's patches processed so far (rank 0 also polls the others)."""
        self.last = seen
        if self.rank == 0:
            self._record(0, seen, final, failed)
            self.poll()
            return
        now = time.monotonic()
        if final or failed or now - self._last_post > 0.2:
            self._requests.append(self.comm.isend((seen, final, failed), dest=0,
                                                  tag=TAG_PROGRESS))
            self._last_post = now

    def should_stop(self) -> bool:
        if self.rank == 0:
            return self.stopping
        if not self.got_stop and self.comm.iprobe(source=0, tag=TAG_STOP):
            self.comm.recv(source=0, tag=TAG_STOP)
            self.got_stop = True
        return self.got_stop

    def _record(self, rank: int, seen: int, final: bool, failed: bool) -> None:
        self.seen[rank] = seen
        self.finished[rank] = self.finished[rank] or final
        if failed and not self.stopping:
            self.stopping = True
            for r in range(1, self.size):
                if not self.finished[r]:
                    self._requests.append(self.comm.isend(None, dest=r, tag=TAG_STOP))
                    self.stopped.append(r)
        if self.bar is not None:
            self.bar.update(sum(self.seen) - self.bar.n)  # tqdm rate-limits the redraws

    def poll(self) -> None:
        from mpi4py import MPI

        status = MPI.Status()
        while self.comm.iprobe(source=MPI.ANY_SOURCE, tag=TAG_PROGRESS, status=status):
            src = status.Get_source()
            seen, final, failed = self.comm.recv(source=src, tag=TAG_PROGRESS)
            self.heard = time.monotonic()
            self._record(src, seen, final, failed)

    def wait_all(self) -> None:
        """Rank 0: keep drawing until every rank reported its end; abort on a silent rank."""
        while not all(self.finished):
            self.poll()
            if time.monotonic() - self.heard > self.stall_timeout:
                quiet = [r for r in range(self.size) if not self.finished[r]]
                print(f"{PROG}: error: no news from rank(s) {quiet} for {self.stall_timeout:.0f}"
                      " s (a rank died or hangs); aborting the job", file=sys.stderr, flush=True)
                self.comm.Abort(3)
            time.sleep(0.02)

    def close(self) -> None:
        from mpi4py import MPI

        MPI.Request.waitall(self._requests)
        if self.bar is not None:
            self.bar.close()


def _fault_limit(rank: int) -> int | None:
    """Test hook: HPCSRL_FAULT_AFTER_PATCHES=k kills this rank (SIGKILL) after k patches,
    on every rank or only on HPCSRL_FAULT_RANK."""
    k = os.environ.get(FAULT_ENV)
    target = os.environ.get(FAULT_RANK_ENV)
    if k is None or (target is not None and int(target) != rank):
        return None
    return int(k)


def tile_rank(plan: Plan, output: Path, rank: int, progress: Progress,
              skip_bad: bool) -> RankResult:
    """Tile this rank's ranges into its shard, or reuse a complete shard from an earlier run."""
    start_time, start_cpu = time.perf_counter(), time.process_time()
    ranges = plan.assignment[rank]
    res = RankResult(rank, ranges=[tuple(r) for r in ranges])
    fp = writer.fingerprint([plan.input_fp, plan.options, res.ranges])
    manifest = writer.reusable_manifest(output, rank, fp)
    if manifest is not None:
        for key in ("kept", "stats", "seen", "dropped_cloud", "dropped_nodata"):
            setattr(res, key, manifest[key])
        res.bad = {int(k): v for k, v in manifest["bad"].items()}
        res.reused = True
        res.seconds = time.perf_counter() - start_time
        res.cpu_seconds = time.process_time() - start_cpu
        return res
    writer.forget_shard(output, rank)
    filt = FilterOptions(plan.options["max_cloud"], plan.options["max_nodata"],
                         plan.options["min_class_fraction"])
    fault = _fault_limit(rank)
    shard = writer.shard_path(output, rank)
    shard.parent.mkdir(parents=True, exist_ok=True)
    with writer.atomic_path(shard) as tmp:
        out = writer.ShardWriter(tmp, plan.layout, capacity=sum(r.size for r in ranges))
        try:
            for rng in ranges:
                scene = plan.scenes[rng.scene]
                stats = writer.BandStats()
                kept, seen_before = 0, res.seen
                batches = tile_range(scene, rng.scene, rng.start, rng.stop, plan.layout, filt)
                while True:
                    try:  # failures of reading/tiling name the scene; writing errors do not
                        batch = next(batches, None)
                    except Exception as exc:  # noqa: BLE001 - any failure must name the scene
                        msg = _describe(exc, scene)
                        if not skip_bad:
                            raise UserError(msg) from None
                        res.bad[rng.scene] = msg  # rows written so far stay unmapped
                        res.seen = seen_before + rng.size  # the bar counts the range as done
                        break
                    if batch is None:
                        break
                    out.append(batch.arrays)
                    kept += batch.n_kept
                    for name in plan.layout.image_datasets():
                        stats.add(name, batch.arrays[name])
                    res.seen += batch.n_seen
                    res.dropped_cloud += batch.dropped_cloud
                    res.dropped_nodata += batch.dropped_nodata
                    if fault is not None and res.seen >= fault:
                        os.kill(os.getpid(), signal.SIGKILL)
                    progress.update(res.seen)
                    if progress.should_stop():
                        raise _Stopped()
                res.kept.append(kept)
                res.stats.append(stats.data)
        finally:
            out.close()
    manifest = {"fingerprint": fp, "rank": rank, "ranges": res.ranges, "kept": res.kept,
                "stats": res.stats, "bad": {str(k): v for k, v in res.bad.items()},
                "seen": res.seen, "dropped_cloud": res.dropped_cloud,
                "dropped_nodata": res.dropped_nodata, "shard_rows": sum(res.kept)}
    writer.write_manifest(output, rank, manifest)
    res.seconds = time.perf_counter() - start_time
    res.cpu_seconds = time.process_time() - start_cpu
    return res


class _Stopped(Exception):
    """Another rank failed: abandon this rank's work (its shard is not kept)."""


def _describe(exc: Exception, scene: Scene) -> str:
    """A one-line message naming the scene and a file of it, for any failure while tiling."""
    if isinstance(exc, UserError):
        return str(exc)
    first = next(iter([*scene.s2.values(), *scene.s1.values()]), None)
    where = f" ({first.path})" if first else ""
    return f"scene {scene.name}{where}: {type(exc).__name__}: {exc}"


# --- phase 3: master and summary (rank 0) ------------------------------------------------------

def finish(plan: Plan, results: list[RankResult], args: argparse.Namespace,
           wall: float) -> tuple[int, list[tuple[str, str]]]:
    """Combine statistics, write and validate the master file; returns (patches, skipped)."""
    bad = {s: msg for r in results for s, msg in r.bad.items()}
    stats = writer.BandStats()
    for r in results:
        for rng, st in zip(r.ranges, r.stats, strict=True):
            if rng[0] not in bad:
                stats.merge(writer.BandStats(st))
    skipped = list(plan.skipped) + [(plan.scenes[s].name, msg) for s, msg in sorted(bad.items())]
    pieces = writer.plan_pieces([r.ranges for r in results], [r.kept for r in results], bad)
    n = sum(p.n for p in pieces)
    dropped_cloud = sum(r.dropped_cloud for r in results)
    dropped_nodata = sum(r.dropped_nodata for r in results)
    if n == 0:
        raise UserError(f"no patch passed the filters ({dropped_cloud} cloudy, {dropped_nodata} "
                        "with no-data dropped); raise --max-cloud / --max-nodata")
    layout = plan.layout
    attrs = _attributes(plan, results, args, stats, skipped)
    attrs.update(dropped_cloud=dropped_cloud, dropped_nodata=dropped_nodata,
                 seconds=round(wall, 3),
                 rank_seconds=[round(r.seconds, 3) for r in results],
                 rank_cpu_seconds=[round(r.cpu_seconds, 3) for r in results])
    writer.write_master(args.output, layout, pieces, [sum(r.kept) for r in results], attrs)
    return n, skipped


def _attributes(plan: Plan, results: list[RankResult], args: argparse.Namespace,
                stats: writer.BandStats, skipped: list[tuple[str, str]]) -> dict[str, Any]:
    from hpcsrl.data.bands import band_resolutions

    layout, ss = plan.layout, plan.sceneset
    images = layout.image_datasets()
    optical = [b for name, (bands, _, _) in images.items() if name in ("data_super", "rgb")
               for b in bands]
    crs = list(dict.fromkeys(s.crs_wkt for s in plan.scenes))
    attrs: dict[str, Any] = {
        "format_version": writer.FORMAT_VERSION,
        "patch_size": layout.patch_size,
        "class_names": list(ss.class_names),
        "s2_bands": optical,
        "s1_bands": list(layout.s1_bands),
        "band_resolutions_m": band_resolutions(optical),
        "scene_names": [s.name for s in plan.scenes],
        "crs_wkt": crs,
        "scene_crs": [crs.index(s.crs_wkt) for s in plan.scenes],
        "scene_geotransform": [list(s.geotransform) for s in plan.scenes],
        "input_format": ss.fmt,
        "command": " ".join(shlex.quote(a) for a in [PROG, *sys.argv[1:]]),
        "n_ranks": len(results),
        "assignment_strategy": args.assignment,
        "assignment": json.dumps([[list(r) for r in res.ranges] for res in results]),
        "balance": balance.balance(plan.assignment),
        "skipped": json.dumps([list(s) for s in skipped]),
        "exclude": lists_attr(args.exclude),
        "max_cloud": args.max_cloud,
        "max_nodata": args.max_nodata,
        "min_class_fraction": args.min_class_fraction,
    }
    for name, (bands, _, _) in images.items():
        mean, std = stats.mean_std(name, len(bands))
        attrs[f"mean_{name}"], attrs[f"std_{name}"] = mean, std
    return attrs


def lists_attr(spec: str) -> list[str]:
    return [item.strip() for item in spec.split(",") if item.strip()]


def summary_table(results: list[RankResult], plan: Plan, n: int, wall: float) -> str:
    """Per-rank table plus totals, balance and wall time."""
    head = (f"{'rank':>4} {'assigned':>9} {'kept':>8} {'cloudy':>7} {'nodata':>7} "
            f"{'seconds':>8} {'cpu s':>7} {'patch/s':>8}  note")
    lines = [head, "-" * len(head)]
    loads = balance.loads(plan.assignment)
    for r, load in zip(results, loads, strict=True):
        rate = r.seen / r.seconds if r.seconds > 0 and not r.reused else 0.0
        lines.append(f"{r.rank:>4} {load:>9} {sum(r.kept):>8} {r.dropped_cloud:>7} "
                     f"{r.dropped_nodata:>7} {r.seconds:>8.2f} {r.cpu_seconds:>7.2f} "
                     f"{rate:>8.1f}  " + ("reused shard" if r.reused else ""))
    total = sum(loads)
    lines.append("-" * len(head))
    lines.append(f"{'all':>4} {total:>9} {n:>8} {sum(r.dropped_cloud for r in results):>7} "
                 f"{sum(r.dropped_nodata for r in results):>7} {wall:>8.2f} "
                 f"{sum(r.cpu_seconds for r in results):>7.2f} "
                 f"{total / wall if wall > 0 else 0.0:>8.1f}")
    lines.append(f"balance (max/mean patches per rank): {balance.balance(plan.assignment):.4f}")
    return "\n".join(lines)


# --- driver ------------------------------------------------------------------------------------

def wait_politely(comm, poll: float = 0.005) -> None:
    """A barrier that sleeps while it waits. Blocking MPI collectives busy-poll, so a rank that
    finished early would burn a core the slower ranks need (ranks often share cores)."""
    if comm.Get_size() == 1:
        return
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(poll)


def probe_ahead(comm, args: argparse.Namespace) -> dict:
    """Every rank probes a share of the files rank 0's discovery is about to probe (header, last
    block, CRS: ~1.5 ms a file, most of discovery) and rank 0 gets all results. Never raises: a
    file left out is probed, and any error reported, by the discovery itself."""
    from preprocess.readers import probe_candidates
    from preprocess.readers.raster import gdal_config, probe_many

    rank, size = comm.Get_rank(), comm.Get_size()
    files: list[str] = []
    config: dict[str, str] = {}
    if rank == 0:
        try:
            files, config = probe_candidates(args.input, args.format)
        except Exception:  # noqa: BLE001 - a bad --input is reported by make_plan
            files, config = [], {}
    wait_politely(comm)
    files, config = comm.bcast((files, config), root=0)
    with gdal_config(**config):
        mine = probe_many(files[rank::size])
    wait_politely(comm)
    parts = comm.gather(mine, root=0)
    return {path: r for part in parts for path, r in part.items()} if rank == 0 else {}


def run(comm, args: argparse.Namespace, discover=None) -> int:
    """The whole pipeline on `comm`; returns the exit code every rank agrees on."""
    rank, size = comm.Get_rank(), comm.Get_size()
    log = get_logger("hpcsrl.preprocess", rank)
    t0 = time.perf_counter()
    args.output = args.output.absolute()

    plan, error = None, None
    ahead = probe_ahead(comm, args) if discover is None and size > 1 else {}
    if rank == 0:
        try:
            with prefetched(ahead):
                plan = make_plan(args, size, discover)
            writer.clean_stale(args.output, size)
        except UserError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - a reader crash still needs one clear line
            error = f"--input {args.input}: {type(exc).__name__}: {exc}"
    wait_politely(comm)  # the other ranks sleep while rank 0 discovers
    plan, error = comm.bcast((plan, error), root=0)
    if error:
        if rank == 0:
            print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
        return 2
    if rank == 0:
        total = sum(plan.counts)
        log.info("%d scenes, %d patches of %d px on %d rank(s), %s assignment, balance %.4f",
                 len(plan.scenes), total, args.patch_size, size, args.assignment,
                 balance.balance(plan.assignment))

    progress = Progress(comm, sum(plan.counts), not args.no_progress, args.stall_timeout)
    try:
        result = tile_rank(plan, args.output, rank, progress, args.skip_bad)
        progress.update(result.seen, final=True)
    except _Stopped:
        result = RankResult(rank, error="")
        progress.update(progress.last, final=True)
    except UserError as exc:
        result = RankResult(rank, error=str(exc))
        progress.update(progress.last, final=True, failed=True)
    except Exception as exc:  # noqa: BLE001 - e.g. disk full while writing the shard
        result = RankResult(rank, error=f"rank {rank} (shard {writer.shard_path(args.output, rank)}"
                            f"): {type(exc).__name__}: {exc}")
        progress.update(progress.last, final=True, failed=True)
    if rank == 0:
        progress.wait_all()
        result.stopped = progress.stopped
    progress.close()
    wait_politely(comm)
    results: list[RankResult] = comm.allgather(result)
    if rank in results[0].stopped and not progress.got_stop:
        comm.recv(source=0, tag=TAG_STOP)  # drain the stop that crossed our final report

    errors = [r.error for r in results if r.error]
    if errors:
        if rank == 0:
            for msg in dict.fromkeys(errors):
                print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)
        return 2

    status = None
    if rank == 0:
        wall = time.perf_counter() - t0
        try:
            n, skipped = finish(plan, results, args, wall)
            print(summary_table(results, plan, n, time.perf_counter() - t0), flush=True)
            for path, reason in skipped:
                print(f"skipped {path}: {reason}", flush=True)
            print(f"wrote {n} patches to {args.output}", flush=True)
        except UserError as exc:
            status = str(exc)
        except Exception as exc:  # noqa: BLE001
            status = f"{args.output}: {type(exc).__name__}: {exc}"
        if status:
            print(f"{PROG}: error: {status}", file=sys.stderr, flush=True)
    wait_politely(comm)  # while rank 0 writes the master file
    status = comm.bcast(status, root=0)
    return 2 if status else 0


def keep_heap_memory() -> None:
    """Let glibc reuse freed buffers instead of returning them to the kernel.

    Every strip allocates megabytes of temporaries; above glibc's default thresholds each one is a
    fresh mmap that the kernel must fault in and zero, and the freed heap top is trimmed and grown
    again. That is memory traffic and system time the two ranks of a 2-core node share: keeping the
    memory (up to glibc's 32 MB mmap ceiling) removes it. No-op where glibc is absent.
    """
    import ctypes

    try:  # the process's own symbols: libc is loaded already (no library search at start-up)
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 1 << 30)
    mallopt(m_top_pad, 64 << 20)


def main(argv: list[str] | None = None) -> int:
    """Console script entry point (`hpcsrl-preprocess`)."""
    args = build_parser().parse_args(argv)
    keep_heap_memory()
    from mpi4py import MPI

    try:
        return run(MPI.COMM_WORLD, args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run through the importable module, so the pickled Plan/RankResult broadcast between ranks
    # are `preprocess.main.*` classes whatever `__main__` is (python -m, cProfile, ...).
    from preprocess.main import main as _main

    sys.exit(_main())
