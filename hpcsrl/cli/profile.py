"""`hpcsrl profile`: measure a model's partitionable units (time, memory, transfer bytes)."""

from __future__ import annotations

import argparse
import platform

from hpcsrl.cli.pretrain import add_shape_arguments, shape_options
from hpcsrl.errors import UserError
from hpcsrl.log import get_logger

METHOD_HELP = "model registry method, e.g. lite-srl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="lite-srl", help=f"{METHOD_HELP} (default lite-srl)")
    p.add_argument("--backbone", default="resnet18", help="resnet18, resnet34 or resnet50")
    add_shape_arguments(p)
    p.add_argument("--bands", type=int, default=3, help="input channels (default 3)")
    p.add_argument("--input-size", type=int, default=224, help="square patch side in pixels")
    p.add_argument("--batch-size", type=int, default=64,
                   help="mini-batch per view (the sequential form runs both views: 2x images)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                   help="sgd (with momentum: state = 2x params) or adam (3x)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per unit (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per unit first")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply measured times (stand in for a slower/faster device)")
    p.add_argument("--threads", type=int, default=None, help="torch compute threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input batch")
    p.add_argument("--out", required=True, help="profile.json to write")


def run(args: argparse.Namespace) -> int:
    import torch

    from hpcsrl.models.registry import build_method
    from hpcsrl.planning.profile import Profile, model_label, save_profile
    from hpcsrl.planning.quantities import format_bytes
    from hpcsrl.profiling.profiler import check_time_scale, profile_units

    log = get_logger()
    for opt in ("bands", "input_size", "batch_size"):
        if getattr(args, opt) < 1:
            raise UserError(f"--{opt.replace('_', '-')} must be at least 1")
    check_time_scale(args.time_scale)  # before minutes of measuring, not after
    if args.threads is not None:
        if args.threads < 1:
            raise UserError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_method(args.method, args.backbone, args.bands, **shape_options(args))
    model.train()
    shape = (args.batch_size, args.bands, args.input_size, args.input_size)
    x_a, x_b = torch.randn(shape), torch.randn(shape)
    units = model.units()
    log.info("profiling %d units of %s/%s, batch %d, %dx%d, %d bands (%d timed + %d warm-up runs)",
             len(units), args.method, args.backbone, args.batch_size, args.input_size,
             args.input_size, args.bands, args.repeats, args.warmup)
    measured = profile_units(units, model.chain_input(x_a, x_b), args.optimizer, args.repeats,
                             args.warmup, args.time_scale, progress=True)
    profile = Profile(
        model=model_label(args.method, args.backbone, shape_options(args)),
        batch_size=args.batch_size,
        input_shape=[args.bands, args.input_size, args.input_size], optimizer=args.optimizer,
        units=measured,
        extra={"method": args.method, "backbone": args.backbone, "stem": args.stem,
               "width": args.width, "model_options": shape_options(args),
               "repeats": args.repeats,
               "warmup": args.warmup, "time_scale": args.time_scale,
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "machine": platform.machine(), "processor": platform.processor() or "unknown"})
    save_profile(profile, args.out)
    total_t = sum(u.time_s for u in measured)
    log.info("wrote %s: %d units, %.3f s forward+backward, %s training memory", args.out,
             len(measured), total_t, format_bytes(profile.total_memory_bytes))
    return 0
