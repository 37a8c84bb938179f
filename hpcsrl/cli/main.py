"""`hpcsrl` entry point: one sub-command per capability, imported lazily (`plan` needs no torch)."""

from __future__ import annotations

import argparse
import importlib
import sys

from hpcsrl.errors import UserError

# sub-command -> (module under hpcsrl.cli, one-line help); modules define add_arguments, run.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("synth", "generate synthetic Sentinel-1/-2 scenes as georeferenced GeoTIFFs"),
    "pretrain": ("pretrain", "self-supervised pre-training (Lite-SRL or a baseline) on an HDF5"),
    "train": ("train", "supervised multi-label classification (ResNet-50), one process or "
              "data parallel"),
    "evaluate": ("evaluate", "freeze / fine-tune evaluation with few labels"),
    "profile": ("profile", "CWB per-unit profile of a model (time, memory, transfer bytes)"),
    "plan": ("plan", "CWB partition plan from a profile and a cluster description"),
    "dhp": ("dhp", "hybrid-parallel pipeline training of a plan over MPI ranks (DHP)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpcsrl",
        description="Self-supervised learning on Sentinel imagery for HPC and on-board clusters.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Only import the module whose arguments are needed (keeps `hpcsrl --help` fast).
        if name in sys.argv[1:2]:
            importlib.import_module(f"hpcsrl.cli.{module}").add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.argv[1:] = argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        mod = importlib.import_module(f"hpcsrl.cli.{args._module}")
        return int(mod.run(args) or 0)
    except UserError as exc:
        print(f"hpcsrl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hpcsrl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
