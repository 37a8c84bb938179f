"""`hpcsrl dhp` on every rank: rank 0 checks the whole run once (plan, ranks, data, options,
output folder) and broadcasts it; every rank builds its stage; the chains run; replicas are
averaged and a full checkpoint written every K iterations; rank 0 writes the report.
"""

from __future__ import annotations

import csv
import io
import math
import os
import pickle
import resource
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mpi4py import MPI
from torch import Tensor

from hpcsrl.errors import UserError
from hpcsrl.fileio import atomic_path, write_json
from hpcsrl.log import get_logger
from hpcsrl.models.base import SSLMethod
from hpcsrl.pipeline.aggregate import Aggregator, digest
from hpcsrl.pipeline.compute import TorchStage
from hpcsrl.pipeline.coordinator import (
    RANK_POLL_MAX_S,
    Coordinator,
    PeerFailure,
    SchedulerClient,
)
from hpcsrl.pipeline.cuts import (
    StageSlice,
    chain_input_only,
    describe_cuts,
    slice_stage,
    stage_bounds,
)
from hpcsrl.pipeline.schedule import Scheduler
from hpcsrl.pipeline.state import (
    StagePart,
    assemble,
    empty_part,
    lr_factor,
    part_layout,
    part_tensors,
    set_momentum,
    split_checkpoint,
    stage_part,
)
from hpcsrl.pipeline.topology import Layout, make_comms
from hpcsrl.pipeline.transport import Pending, Transport, Waiter, as_buffer
from hpcsrl.pipeline.worker import StageWorker
from hpcsrl.procs import ended_on_this_host

CHECKPOINT = "checkpoint.pt"
REPORT = "dhp_report.json"
RANKS_CSV = "dhp_ranks.csv"
ASSIGNMENT_CSV = "dhp_assignment.csv"
# Methods whose update is local to a stage. BYOL and MoCo-v2 are refused: their last unit runs
# a momentum copy of the whole online network, updated from every online parameter each step, so
# the last stage would need all other stages' parameters after every step.
SUPPORTED = ("lite-srl", "simsiam", "simclr", "dual-simclr")
MOMENTUM_METHODS = ("byol", "moco-v2")
RANK_FIELDS = ("rank", "host", "stage", "replica", "iterations", "busy_s", "wait_s",
               "aggregate_s", "bytes_sent", "bytes_received", "messages_sent",
               "messages_received", "peak_rss_bytes", "rss_before_stage_bytes",
               "plan_memory_bytes")
# pretrain-record keys that must match for --resume (the plan and rank count may change)
RESUME_KEYS = ("method", "backbone", "bands", "batch_size", "input_size", "lr", "weight_decay",
               "momentum", "seed", "limit", "monitor_samples", "method_options", "augment")


@dataclass
class DhpOptions:
    plan: str
    data: str
    out: str
    bands: str = "rgb"
    chains: str = "dynamic"
    iterations: int | None = None
    epochs: int | None = None
    aggregate_every: int = 100
    resume: bool = False
    stop_after: int | None = None
    timeout: float = 30.0
    memory: int | None = None
    method: str | None = None
    backbone: str | None = None
    batch_size: int | None = None
    input_size: int | None = None
    lr: float | None = None
    weight_decay: float = 1e-4
    momentum: float = 0.9
    seed: int = 0
    limit: int | None = None
    monitor_samples: int = 512
    augment: str = "chips"
    pretrain_on: str = "pool"    # the split's pool only (as hpcsrl pretrain), or "all"
    split: str | None = None     # split.json to reuse (default OUT/split.json, drawn if absent)
    split_options: dict[str, Any] = field(default_factory=dict)  # SplitSpec fields set
    method_options: dict[str, Any] = field(default_factory=dict)
    wait: str = "poll"
    threads: int = 1
    emulate: str | None = None   # a profile: sleep its times instead of computing (emulate.py)
    time_scale: float = 1.0
    slowdown: dict[int, float] = field(default_factory=dict)


# --- checks on rank 0 ------------------------------------------------------------------------
def _read_plan(path: str) -> dict[str, Any]:
    import json

    try:
        plan = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"--plan {path}: no such file (write one with `hpcsrl plan`)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"--plan {path}: not readable JSON ({exc})") from None
    stages = plan.get("stages") if isinstance(plan, dict) else None
    if not isinstance(stages, list) or not stages or not all(
            isinstance(s, dict) and {"first_unit", "last_unit", "replicas"} <= s.keys()
            for s in stages):
        raise UserError(f"--plan {path}: no stages with first_unit/last_unit/replicas "
                        "(write it with `hpcsrl plan`)")
    return plan


def check_run(o: DhpOptions, size: int) -> dict[str, Any]:
    """Everything that can be wrong before any rank works; returns the run description that
    every rank builds from. Raises UserError (one line)."""
    from hpcsrl.data import PatchDataset
    from hpcsrl.data.splits import pretraining_patches
    from hpcsrl.models.registry import METHODS, build_method
    from hpcsrl.planning.profile import model_label
    from hpcsrl.planning.quantities import format_bytes
    from hpcsrl.train.batches import check_batch_size, epoch_batches, labels_of, split_indices
    from hpcsrl.train.checkpoint import read_checkpoint
    from hpcsrl.train.loop import PretrainConfig

    plan = _read_plan(o.plan)
    replicas = [int(s["replicas"]) for s in plan["stages"]]
    need = sum(replicas)
    if size != need:
        raise UserError(f"--plan {o.plan} needs {need} ranks ({'/'.join(map(str, replicas))} "
                        f"replicas per stage) but this run has {size}: start it with "
                        f"mpirun -np {need} (or srun -n {need})")
    model_name = str(plan.get("model") or "")
    p_method, p_backbone = ([*model_name.split("/"), ""])[:2]
    shape = dict(plan.get("model_options") or {})  # the profiled stem / width
    if (shape or model_name.count("/") > 1) and model_label(p_method, p_backbone,
                                                             shape) != model_name:
        raise UserError(f"--plan {o.plan} names model {model_name} but records no matching "
                        f"shape options ({shape or 'none'}): it predates them; run `hpcsrl "
                        "profile` and `hpcsrl plan` again")
    clash = {k for k in shape if k in o.method_options and o.method_options[k] != shape[k]}
    if clash:
        raise UserError(f"--method-option {', '.join(sorted(clash))} differs from the plan's "
                        f"{model_name} (profiled with {shape}): profile and plan that shape")
    options = {**o.method_options, **shape}
    method = o.method or p_method
    backbone = o.backbone or p_backbone or "resnet18"
    if method in MOMENTUM_METHODS:
        raise UserError(f"--method {method} is not supported by DHP: its momentum target copies "
                        "every online parameter after each step, which needs the whole model in "
                        f"one place; use one of {', '.join(SUPPORTED)} (or hpcsrl pretrain)")
    if method not in METHODS or method not in SUPPORTED:
        raise UserError(f"--plan {o.plan}: model {model_name!r} is not a supported DHP method "
                        f"({', '.join(SUPPORTED)})")
    if (o.method and p_method and o.method != p_method) or (
            o.backbone and p_backbone and o.backbone != p_backbone):
        raise UserError(f"--plan {o.plan} was made for {model_name}, not {method}/{backbone}: "
                        "profile and plan that model, or drop --method/--backbone")
    if o.aggregate_every < 1 or o.timeout <= 0:
        raise UserError("--aggregate-every must be at least 1 and --timeout positive")
    if (o.iterations is None) == (o.epochs is None):
        raise UserError("give exactly one of --iterations N or --epochs E")
    if (o.iterations or 1) < 1 or (o.epochs or 1) < 1:
        raise UserError("--iterations / --epochs must be at least 1")
    batch = o.batch_size or int(plan.get("batch_size") or 0)
    if batch < 2:
        raise UserError(f"--plan {o.plan} has no batch size: pass --batch-size (at least 2)")
    if o.batch_size and plan.get("batch_size") and o.batch_size != plan["batch_size"]:
        raise UserError(f"--batch-size {o.batch_size} differs from the plan's "
                        f"{plan['batch_size']} (its stage times and memory hold for that batch): "
                        "re-profile and re-plan, or drop --batch-size")
    shape = plan.get("input_shape") or []
    size_px = o.input_size or (int(shape[1]) if len(shape) == 3 else 0)
    if size_px < 32:
        raise UserError("--input-size must be at least 32 (the plan does not give one)")
    if o.input_size and len(shape) == 3 and o.input_size != shape[1]:
        raise UserError(f"--input-size {o.input_size} differs from the plan's {shape[1]} px "
                        "(profiled there): re-profile and re-plan, or drop --input-size")
    ds = PatchDataset(o.data, bands=o.bands)
    if len(shape) == 3 and shape[0] != ds.channels:
        raise UserError(f"--plan {o.plan} was profiled with {shape[0]} bands but --bands "
                        f"{o.bands} of {o.data} gives {ds.channels}: use matching --bands, or "
                        f"profile with --bands {ds.channels} and plan again")
    if method == "dual-simclr" and ds.sensor != "s1s2":
        raise UserError("--method dual-simclr needs --bands s1s2")
    with torch.device("meta"):
        model = build_method(method, backbone, in_channels=ds.channels, **options)
    names = [n for n, _ in model.units()]
    last = int(plan["stages"][-1]["last_unit"])
    cuts = [int(s["first_unit"]) for s in plan["stages"][1:]]
    ok = last == len(names) - 1 and int(plan["stages"][0]["first_unit"]) == 0 and all(
        s.get("first_name", names[int(s["first_unit"])]) == names[int(s["first_unit"])]
        and s.get("last_name", names[int(s["last_unit"])]) == names[int(s["last_unit"])]
        for s in plan["stages"] if int(s["last_unit"]) < len(names))
    if not ok or cuts != sorted(set(cuts)):
        raise UserError(f"--plan {o.plan} does not fit {method}/{backbone} with {ds.channels} "
                        f"bands ({len(names)} units): it comes from another model; profile and "
                        "plan this one")
    if o.memory is not None:
        for i, s in enumerate(plan["stages"]):
            if int(s.get("memory_bytes", 0)) > o.memory:
                raise UserError(f"--plan {o.plan}: stage {i} needs "
                                f"{format_bytes(int(s['memory_bytes']))} but --memory is "
                                f"{format_bytes(o.memory)}: plan with --memory "
                                f"{format_bytes(o.memory)} or give the nodes more memory")
    cfg = PretrainConfig(method=method, backbone=backbone, bands=o.bands, epochs=1,
                         batch_size=batch, input_size=size_px, lr=o.lr,
                         weight_decay=o.weight_decay, momentum=o.momentum, seed=o.seed,
                         limit=o.limit, monitor_samples=o.monitor_samples,
                         method_options=options, augment=o.augment,
                         progress=False)
    out = Path(o.out)
    from hpcsrl.train.lock import RunLock

    # The folder lock first: a run refused because another one holds OUT must not write
    # OUT/split.json. From here every refusal releases it.
    lock = RunLock(out).acquire()
    try:
        probe = out / f".write-test.{os.getpid()}"
        try:
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"--out {out}: not writable ({exc.strerror})") from None
        # the split's pool by default, as `hpcsrl pretrain`; recorded in the checkpoint, so
        # `hpcsrl evaluate` scores the same test part and --resume refuses another split
        ds = pretraining_patches(o.data, o.bands, o.split or out / "split.json",
                                 o.split_options, o.pretrain_on)
        train_idx = split_indices(len(ds), labels_of(ds), cfg)[0]
        check_batch_size(len(train_idx), batch)
    except UserError:
        lock.release()
        raise
    spe = len(epoch_batches(train_idx, batch, o.seed, 0))
    total = o.iterations if o.iterations is not None else (o.epochs or 1) * spe
    cfg.epochs = math.ceil(total / spe)
    record = asdict(cfg)
    for k in ("workers", "progress", "knn_k", "in_memory"):
        record.pop(k, None)
    record["dhp_total_iterations"] = total
    first, resume_from = 0, None
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and not o.resume:
        lock.release()
        raise UserError(f"{ckpt_path} exists: pass --resume to continue that run, or choose "
                        "another --out")
    history: list[dict[str, Any]] = []
    if o.resume and ckpt_path.exists():
        ckpt = read_checkpoint(ckpt_path)
        saved = ckpt.get("pretrain", {})
        diff = [f"{k} {saved.get(k)!r} (now {record[k]!r})" for k in
                (*RESUME_KEYS, "dhp_total_iterations") if saved.get(k) != record[k]]
        if ckpt.get("config") != model.config:
            diff.append(f"model {ckpt.get('config')} (now {model.config})")
        was = (ckpt.get("data") or {}).get("split") or {}
        now = ds.split_record
        if (was.get("digest"), was.get("pretrain_on")) != (now["digest"], now["pretrain_on"]):
            diff.append(f"split {was.get('path')} ({was.get('pretrain_on', 'all patches')}, "
                        f"digest {was.get('digest')}; now {now['path']}, {now['pretrain_on']}, "
                        f"digest {now['digest']})")
        if diff:
            lock.release()
            raise UserError(f"{ckpt_path} was made with different options: {'; '.join(diff)}; "
                            "resume with the same options (the plan and rank count may change)")
        first = int(ckpt.get("dhp", {}).get("iteration", 0))
        history = list(ckpt.get("history", []))
        resume_from = str(ckpt_path)
    end = total
    if o.stop_after is not None:
        windows = max(1, math.ceil((o.stop_after - first) / o.aggregate_every))
        end = min(total, first + windows * o.aggregate_every)
    return {
        "plan": plan, "replicas": replicas, "cuts": cuts, "n_units": len(names),
        "cut_specs": describe_cuts(model.config, batch, ds.channels, size_px, cuts),
        "config": model.config, "cfg": asdict(cfg), "record": record, "channels": ds.channels,
        "band_names": list(ds.band_names), "sensor": ds.sensor, "steps_per_epoch": spe,
        "total": total, "first": first, "end": end, "resume_from": resume_from,
        "history": history, "data": ds.fingerprint(), "rows": ds.indices.tolist(),
        "lock": lock}


# --- helpers ---------------------------------------------------------------------------------
def _peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _gather(comm: MPI.Comm, obj: Any, waiter: Waiter, what: str) -> list[Any] | None:
    """Objects of every rank at rank 0 (pickled; checkpoints and reports only), polled."""
    rank, size = comm.Get_rank(), comm.Get_size()
    if rank != 0:
        req = comm.isend(obj, dest=0, tag=7)
        waiter.wait(Pending([req]), what)
        return None
    out: list[Any] = [None] * size
    out[0] = obj
    for src in range(1, size):
        out[src] = _polled_recv(comm, src, 7, waiter, what)
    return out


def _polled_recv(comm: MPI.Comm, src: int, tag: int, waiter: Waiter, what: str) -> Any:
    """A pickled object from `src`, probed with a back-off (a blocking recv spins a core)."""
    sleep = 20e-6
    t0 = time.perf_counter()
    while not comm.Iprobe(source=src, tag=tag):
        if waiter.on_poll is not None:
            waiter.on_poll(what)
        time.sleep(sleep)
        sleep = min(2e-3, sleep * 2)
    waiter.wait_s += time.perf_counter() - t0
    return comm.recv(source=src, tag=tag)


def _polled_barrier(comm: MPI.Comm, waiter: Waiter, what: str) -> None:
    waiter.wait(Pending([comm.Ibarrier()]), what)


# --- the run -----------------------------------------------------------------------------------
def run(o: DhpOptions) -> int:
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    log = get_logger("hpcsrl.dhp", rank=rank)
    torch.set_num_threads(max(1, o.threads))
    spec: dict[str, Any] | None = None
    lock = None
    if rank == 0:
        try:
            if o.emulate:
                from hpcsrl.pipeline.emulate import check_emulated_run

                spec = check_emulated_run(o, size)
            else:
                spec = check_run(o, size)
            lock = spec.pop("lock")
        except UserError as exc:
            spec = {"error": str(exc)}
    spec = world.bcast(spec, root=0)
    if "error" in spec:
        if rank == 0:
            print(f"hpcsrl dhp: error: {spec['error']}", file=sys.stderr, flush=True)
        return 2
    try:
        return _run(o, world, spec, log)
    finally:
        if lock is not None:
            lock.release()


def _run(o: DhpOptions, world: MPI.Comm, spec: dict[str, Any], log: Any) -> int:
    from hpcsrl.train.loop import PretrainConfig

    rank = world.Get_rank()
    layout = Layout.of(spec["replicas"])
    stage, replica = layout.stage_of(rank), layout.replica_of(rank)
    cfg = PretrainConfig(**spec["cfg"])
    bounds = stage_bounds(spec["cuts"], spec["n_units"])
    total = spec["total"]
    err = None
    compute = None
    rss_before_stage = _peak_rss()  # interpreter, torch, MPI: what no stage can save
    try:
        if "emulate" in spec:  # profiled sleeps and cut sizes instead of the model
            from hpcsrl.pipeline.emulate import emulated_stage

            compute = emulated_stage(spec, stage, rank)
        else:
            part, momentum, shell = _receive_stage(world, spec, layout, bounds, Waiter(o.wait))
            specs = spec["cut_specs"]
            in_spec = specs[stage - 1] if stage > 0 else None
            out_spec = specs[stage] if stage < layout.stages - 1 else None
            from hpcsrl.train.optim import make_optimizer

            opt = make_optimizer(part.params, cfg)

            def lr_at(mb: int) -> float:
                return cfg.base_lr * lr_factor(total, mb)

            source = (_data_source(o, cfg, shell, spec["steps_per_epoch"], spec["rows"])
                      if stage == 0 else None)
            compute = TorchStage(part, in_spec, out_spec, opt, lr_at, source)
            set_momentum(compute, momentum)
    except UserError as exc:
        err = f"rank {rank}: {exc}"
    errors = world.allgather(err)
    if any(errors):
        if rank == 0:
            print(f"hpcsrl dhp: error: {next(e for e in errors if e)}", file=sys.stderr,
                  flush=True)
        return 2
    assert compute is not None
    split = (spec.get("data") or {}).get("split")
    if rank == 0 and split:
        from hpcsrl.data.splits import pretraining_message

        log.info("%s", pretraining_message(split, len(spec["rows"])))
    procs = world.allgather((socket.gethostname(), os.getpid()))
    comms = make_comms(world, layout)
    coordinator = None
    if rank == 0:
        sched = Scheduler(layout, total=spec["end"], aggregate_every=o.aggregate_every,
                          policy=o.chains, first=spec["first"])
        coordinator = Coordinator(comms.sched, sched, o.timeout, min(2.0, o.timeout / 5))
    client = SchedulerClient(comms.sched, rank, layout, o.timeout, min(2.0, o.timeout / 5),
                             coordinator)
    waiter = Waiter(o.wait, max_sleep_s=RANK_POLL_MAX_S, on_poll=client.check)
    transport = Transport(comms.data)
    aggregator = Aggregator(comms.stage, waiter.wait, compute.counters())
    writer = _Writer(o, spec, layout, coordinator, log) if rank == 0 else None
    times: dict[str, float] = {}
    digests: list[str] = []  # the stage state after each aggregation (replicas must agree)

    def on_aggregate(round_: int, final: bool) -> None:
        if final:
            times["stop"] = time.perf_counter()
        aggregator(compute.state(), compute.counters(), worker.stats.since_aggregation,
                   f"averaging stage {stage} with its replicas")
        # a lone replica has nothing to agree with; hashing its state (0.5 s for ResNet-18's
        # last 98 MB) would pause every chain at each aggregation
        digests.append(digest([*compute.state(), *compute.counters()])
                       if layout.replicas[stage] > 1 else "single replica")
        st = worker.stats
        part = stage_part(compute) if replica == 0 and "emulate" not in spec else None
        msg = {"rank": rank, "loss_sum": st.loss_sum, "loss_n": st.loss_n,
               "part": part_layout(part) if part is not None else None}
        st.loss_sum, st.loss_n = 0.0, 0
        what = "sending its stage to rank 0 for the checkpoint"
        got = _gather(comms.ckpt, msg, waiter, what)
        if got is None:
            if part is not None:  # raw buffers, no copy: the state is not touched until sent
                waiter.wait(Pending([comms.ckpt.Isend(as_buffer(t), dest=0, tag=8)
                                     for t in part_tensors(part)]), what)
            return
        parts = [] if part is None else [part]
        for src, m in enumerate(got):
            if src > 0 and m["part"] is not None:
                theirs, bufs = empty_part(m["part"])
                waiter.wait(Pending([comms.ckpt.Irecv(as_buffer(t), source=src, tag=8)
                                     for t in bufs]), f"receiving rank {src}'s stage")
                parts.append(theirs)
        if writer is not None:
            writer.checkpoint(got, parts, round_, final)

    worker = StageWorker(layout, rank, compute, transport, client, waiter, on_aggregate)
    _polled_barrier(world, Waiter(o.wait), "starting")
    if coordinator is not None:
        _name_the_dead_on_sigterm(coordinator, procs)
        coordinator.start()
    times["start"] = time.perf_counter()
    try:
        worker.run()
        c = transport.counters
        row = {"rank": rank, "host": socket.gethostname(), "stage": stage, "replica": replica,
               "iterations": worker.stats.iterations, "busy_s": round(worker.stats.busy_s, 4),
               "wait_s": round(waiter.wait_s + client.wait_s, 4),
               "aggregate_s": round(worker.stats.aggregate_s, 4),
               "bytes_sent": c.bytes_sent, "bytes_received": c.bytes_received,
               "messages_sent": c.messages_sent, "messages_received": c.messages_received,
               "peak_rss_bytes": _peak_rss(), "rss_before_stage_bytes": rss_before_stage,
               "plan_memory_bytes": int(spec["plan"]["stages"][stage].get("memory_bytes", 0)),
               "state_digests": digests}
        rows = _gather(comms.ckpt, row, waiter, "sending its report to rank 0")
        if writer is not None and rows is not None:
            writer.report(rows, times["stop"] - times["start"])
        _polled_barrier(world, waiter, "finishing")
    except PeerFailure:
        sys.stderr.flush()
        os._exit(4)
    except UserError as exc:
        print(f"hpcsrl dhp: error: rank {rank}: {exc}", file=sys.stderr, flush=True)
        client.fail()
        time.sleep(0.5)
        os._exit(2)
    except Exception as exc:
        print(f"hpcsrl dhp: error: rank {rank} (stage {stage}) failed: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        client.fail()
        time.sleep(0.5)
        os._exit(1)
    if coordinator is not None:
        coordinator.stop()
        coordinator.join()
    world.Barrier()
    client.close()
    return 0


def _name_the_dead_on_sigterm(coordinator: Coordinator, procs: list[tuple[str, int]]) -> None:
    """mpirun / srun stop every rank at once when one dies (SIGKILL, crash), before DHP's own
    --timeout could notice: rank 0 then says which rank died and what it was doing."""
    layout = coordinator.layout

    def handler(signum: int, frame: Any) -> None:
        if coordinator.failure is None:
            dead = [r for r, (host, pid) in enumerate(procs) if ended_on_this_host(host, pid)]
            if dead:
                r = dead[0]
                what = (f"{layout.describe(r)} died while {coordinator.sched.activity(r)}; "
                        "the launcher stopped every rank")
            else:
                what = ("the launcher stopped every rank (a rank on another host died or the job "
                        "was cancelled: see the launcher's message)")
            print(f"hpcsrl dhp: error: {what}", file=sys.stderr, flush=True)
        os._exit(4)

    signal.signal(signal.SIGTERM, handler)


def _data_source(o: DhpOptions, cfg: Any, model: Any, steps_per_epoch: int,
                 rows: list[int]) -> Any:
    """chain input of mini-batch `mb`: its patches (the shared assignment) and its two views.
    `rows`: the file rows pre-training reads (rank 0's split, sent in the run description so
    no rank needs OUT on a shared file system)."""
    from hpcsrl.data import PatchDataset
    from hpcsrl.train.batches import epoch_batches, labels_of, split_indices, view_generator
    from hpcsrl.train.loop import view_transform, views

    ds = PatchDataset(o.data, bands=o.bands, indices=np.asarray(rows, dtype=np.int64))
    train_idx = split_indices(len(ds), labels_of(ds), cfg)[0]
    transform = view_transform(ds, cfg)
    cache: dict[int, list[np.ndarray]] = {}
    chain_input = model.chain_input

    def source(mb: int) -> Any:
        epoch, pos = divmod(mb, steps_per_epoch)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = epoch_batches(train_idx, cfg.batch_size, cfg.seed, epoch)
        x = ds.read_batch(np.sort(cache[epoch][pos]))[0]
        x_a, x_b = views(transform, cfg.input_size, x, view_generator(cfg.seed, epoch, pos))
        return chain_input(x_a, x_b)

    return source


def _receive_stage(world: MPI.Comm, spec: dict[str, Any], layout: Layout,
                   bounds: list[tuple[int, int]], waiter: Waiter
                   ) -> tuple[StageSlice, dict[str, Tensor], SSLMethod | None]:
    """This rank's stage, built once on rank 0 and sent: (units with their parameters and
    buffers, SGD momentum by parameter name, the chain-input shell on stage 0).

    Only rank 0 ever holds the whole model, and only here: it builds it with the run's seed (so
    the initial weights are those of `hpcsrl pretrain`), loads the --resume checkpoint into it,
    pickles each stage's units to that stage's ranks, and keeps its own stage. Every other rank
    holds its own stage's tensors and nothing else, whatever plan wrote the checkpoint.
    """
    rank = world.Get_rank()
    if rank != 0:
        blob = _polled_recv(world, 0, 11, waiter, "receiving its stage from rank 0")
        if blob is None:
            raise UserError("rank 0 could not build the model (see its message)")
        return pickle.loads(blob)
    try:
        return _send_stages(world, spec, layout, bounds)
    except BaseException:
        for r in range(1, layout.size):  # nobody waits for a stage that will not come
            world.send(None, dest=r, tag=11)
        raise


def _send_stages(world: MPI.Comm, spec: dict[str, Any], layout: Layout,
                 bounds: list[tuple[int, int]]
                 ) -> tuple[StageSlice, dict[str, Tensor], SSLMethod | None]:
    from hpcsrl.models.registry import model_from_config

    torch.manual_seed(int(spec["cfg"]["seed"]))
    model = model_from_config(spec["config"])
    model.to(memory_format=torch.channels_last)
    model.train()
    momentum: dict[str, Tensor] = {}
    if spec.get("resume_from"):
        from hpcsrl.train.checkpoint import read_checkpoint

        state, momentum = split_checkpoint(read_checkpoint(spec["resume_from"]))
        model.load_state_dict(state)
        del state
    shell = chain_input_only(model)
    mine = None
    for s in range(layout.stages):
        part = slice_stage(model, *bounds[s])
        msg = (part, {n: momentum[n] for n in part.param_names if n in momentum},
               shell if s == 0 else None)
        if s == 0:
            mine = msg
        others = [r for r in layout.ranks_of(s) if r != 0]
        if others:  # pickled once per stage, the same bytes to each replica
            blob = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
            for r in others:
                world.send(blob, dest=r, tag=11)
            del blob
        del part, msg
    del model
    assert mine is not None
    return mine


class _Writer:
    """Rank 0's files: checkpoint (each aggregation), history, assignment, report."""

    def __init__(self, o: DhpOptions, spec: dict[str, Any], layout: Layout,
                 coordinator: Coordinator | None, log: Any) -> None:
        from hpcsrl.train.loop import PretrainConfig

        self.o, self.spec, self.layout, self.coord, self.log = o, spec, layout, coordinator, log
        self.cfg = PretrainConfig(**spec["cfg"])
        self.out = Path(o.out)
        self.history: list[dict[str, Any]] = list(spec["history"])
        self.t0 = time.perf_counter()
        self.rows_before = self._old_assignment()

    def _old_assignment(self) -> list[list[Any]]:
        path = self.out / ASSIGNMENT_CSV
        if not self.spec.get("resume_from") or not path.exists():
            return []
        with path.open() as f:
            rows = list(csv.reader(f))[1:]
        return [r for r in rows if r and int(r[0]) < self.spec["first"]]

    def checkpoint(self, msgs: list[dict[str, Any]], parts: list[StagePart], round_: int,
                   final: bool) -> None:
        from hpcsrl.train.checkpoint import rng_state, write_checkpoint

        # ids are issued in windows of K from `first`: round r ends at first + r K (or the end)
        it = self.spec["end"] if final else min(
            self.spec["end"], self.spec["first"] + round_ * self.o.aggregate_every)
        if "emulate" in self.spec:  # no model to save: the assignment and a log line
            self._write_assignment(it)
            self.log.info("iteration %d/%d (emulated)%s", it, self.spec["total"],
                          "  (final)" if final else "")
            return
        state = assemble(self.spec["config"], parts, self.cfg, self.spec["total"], it)
        loss_n = sum(m["loss_n"] for m in msgs)
        loss = sum(m["loss_sum"] for m in msgs) / loss_n if loss_n else float("nan")
        lr = state["optimizer"]["param_groups"][0]["lr"]
        secs = time.perf_counter() - self.t0
        self.history.append({"iteration": it, "epoch": it / self.spec["steps_per_epoch"],
                             "loss": loss, "lr": lr, "seconds": round(secs, 3)})
        write_checkpoint(self.out / CHECKPOINT, {
            "config": self.spec["config"], "pretrain": self.spec["record"],
            "epoch": it // self.spec["steps_per_epoch"], **state, "rng": rng_state(),
            "history": self.history, "band_names": self.spec["band_names"],
            "sensor": self.spec["sensor"], "data": self.spec["data"],
            "ranks": self.layout.size,
            "dhp": {"iteration": it, "total": self.spec["total"], "chains": self.o.chains,
                    "replicas": list(self.layout.replicas), "cuts": self.spec["cuts"],
                    "aggregate_every": self.o.aggregate_every}})
        self._write_assignment(it)
        self.log.info("iteration %d/%d  loss %.4f  lr %.4g  %.1f s%s", it, self.spec["total"],
                      loss, lr, secs, "  (final)" if final else "")

    def _write_assignment(self, upto: int) -> None:
        assert self.coord is not None
        with self.coord.lock:
            items = sorted((mb, list(c)) for mb, c in self.coord.sched.assignment.items()
                           if mb < upto)
        spe = self.spec["steps_per_epoch"]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["minibatch", "epoch", "position", *(f"stage{s}_rank"
                                                       for s in range(self.layout.stages))])
        w.writerows(self.rows_before)
        for mb, chain in items:
            w.writerow([mb, mb // spe, mb % spe, *chain])
        with atomic_path(self.out / ASSIGNMENT_CSV) as tmp:
            tmp.write_text(buf.getvalue())

    def report(self, rows: list[dict[str, Any]], wall_s: float) -> None:
        assert self.coord is not None
        iterations = self.spec["end"] - self.spec["first"]
        plan = self.spec["plan"]
        with self.coord.lock:
            events, sched_s = self.coord.events, self.coord.busy_s
        report = {
            "chains": self.o.chains, "iterations": iterations,
            "first_iteration": self.spec["first"], "total_iterations": self.spec["total"],
            "wall_s": round(wall_s, 4),
            "throughput_per_s": iterations / wall_s if wall_s > 0 else None,
            "bound_per_s": plan.get("throughput_bound_per_s"),
            "replicas": list(self.layout.replicas), "cuts": self.spec["cuts"],
            "aggregate_every": self.o.aggregate_every, "wait_mode": self.o.wait,
            "emulate": self.spec.get("emulate"), "scheduler_events": events,
            "scheduler_ms_per_minibatch": 1e3 * sched_s / max(1, iterations),
            "assignment": ASSIGNMENT_CSV, "checkpoint": CHECKPOINT,
            "ranks": rows}
        write_json(self.out / REPORT, report)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=RANK_FIELDS, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in RANK_FIELDS})
        with atomic_path(self.out / RANKS_CSV) as tmp:
            tmp.write_text(buf.getvalue())
        self.log.info("%d iterations in %.1f s: %.3f mini-batches/s (plan bound %s); report %s",
                      iterations, wall_s, report["throughput_per_s"] or 0.0,
                      f"{report['bound_per_s']:.3f}" if report["bound_per_s"] else "n/a",
                      self.out / REPORT)
