"""`hpcsrl evaluate`: few-label freeze / fine-tune evaluation of a pre-trained encoder + floors.

Validation and test side by side: candidate settings (input size, probe weight decay and epochs)
are compared on the validation part of the split, the test part is scored for the chosen one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from hpcsrl.cli.pretrain import (
    add_precision_argument,
    add_shape_arguments,
    add_split_arguments,
    shape_options,
    split_options,
)
from hpcsrl.errors import UserError
from hpcsrl.log import get_logger

PAPER_EPOCHS = 200  # source paper Sec. 5: Adam, batch 64, cosine decay within 200 epochs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="DIR/checkpoint.pt written by `hpcsrl pretrain` "
                   "(omit with --random-init)")
    p.add_argument("--data", required=True, help="labelled patch HDF5 (hpcsrl-preprocess output)")
    p.add_argument("--bands", default=None,
                   help="band set to read (rgb, s2-10m, s2, s1, s1s2); default: the checkpoint's")
    p.add_argument("--mode", default="both", metavar="MODE[,MODE...]",
                   help="freeze: linear classifier on the frozen encoder's pooled last stage; "
                   "freeze-stages: linear classifier on its pooled last k stages concatenated "
                   "(k chosen on validation from --probe-stages); finetune: whole network; "
                   "both = freeze,finetune (default)")
    p.add_argument("--probe-stages", default="1,2,3", metavar="K[,K...]",
                   help="freeze-stages candidates: how many of the last ResNet stages are "
                   "pooled and concatenated (default 1,2,3)")
    p.add_argument("--label-fractions", default="0.1,0.2,0.5",
                   help="comma-separated fractions of the pool's labelled patches used as "
                   "labels (default 0.1,0.2,0.5; nested)")
    p.add_argument("--epochs", default=str(PAPER_EPOCHS), metavar="E[,E...]",
                   help="linear-probe epochs; a list is chosen from on validation "
                   "(default 200, the paper's)")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help="epochs of the (much slower) fine-tune runs; default: --epochs")
    p.add_argument("--batch-size", type=int, default=64, help="(default 64, the paper's)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="Adam learning rate of the linear head (default 1e-3)")
    p.add_argument("--encoder-lr", type=float, default=1e-4,
                   help="Adam learning rate of the encoder when fine-tuning (default 1e-4)")
    p.add_argument("--weight-decay", default="0", metavar="WD[,WD...]",
                   help="Adam weight decay of the linear probe; a list is chosen from on "
                   "validation (fine-tuning uses the first; default 0)")
    p.add_argument("--finetune-head", choices=("probe", "new"), default="probe",
                   help="fine-tuning starts from a linear probe fitted on the frozen features "
                   "(LP-FT, default: a short fine-tune then refines good features instead of "
                   "first bending them towards a random head) or from a new random head")
    p.add_argument("--no-augment", action="store_true",
                   help="no flips/rotations while fine-tuning")
    p.add_argument("--seed", type=int, default=0, help="initialisation and shuffling seed")
    p.add_argument("--max-samples", type=int, default=None,
                   help="evaluate on a stratified subsample of this many labelled patches "
                   "(each part of the split cut in proportion)")
    p.add_argument("--input-size", default=None, metavar="PX[,PX...]",
                   help="resize patches to PX x PX (bilinear) before every encoder; their "
                   "BatchNorm statistics are re-estimated at that size on --bn-samples "
                   "unlabelled pool patches (default: the patch size, no resizing); a list "
                   "(0 = the patch size) is chosen from on validation. The paper feeds "
                   "EuroSAT's 64-px chips at 224 px")
    p.add_argument("--bn-samples", type=int, default=2048,
                   help="patches for the BatchNorm statistics with --input-size (default 2048)")
    p.add_argument("--random-init", action="store_true",
                   help="evaluate only a randomly initialised encoder (no checkpoint)")
    p.add_argument("--method", default="lite-srl", help="architecture for --random-init")
    p.add_argument("--backbone", default="resnet18", help="backbone for --random-init")
    add_shape_arguments(p, note=" (for --random-init: a checkpoint records its own)")
    p.add_argument("--no-random-floor", action="store_true",
                   help="skip the random-init encoder rows beside a checkpoint")
    p.add_argument("--no-knn-floor", action="store_true",
                   help="skip the channel-statistics k-NN rows")
    p.add_argument("--no-tsne", action="store_true", help="skip the t-SNE plots")
    p.add_argument("--tsne-points", type=int, default=2000,
                   help="t-SNE subsample size (default 2000)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch compute threads (1 when several jobs share the machine)")
    add_precision_argument(p)
    p.add_argument("--out", required=True, help="output folder for report.csv and plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_split_arguments(p)


def parse_fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--label-fractions {text!r}: expected numbers like 0.1,0.2,0.5") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise UserError(f"--label-fractions {text!r}: every value must be in (0, 1]")
    return tuple(sorted(set(values)))


def parse_list(text: str, option: str, kind: type, low: float) -> tuple:
    """'a,b,c' -> typed candidates, each >= low, duplicates dropped, order kept."""
    try:
        values = tuple(dict.fromkeys(kind(v) for v in str(text).split(",") if v.strip()))
    except ValueError:
        raise UserError(f"{option} {text!r}: expected {kind.__name__}s separated by commas"
                        ) from None
    if not values or any(v < low for v in values):
        raise UserError(f"{option} {text!r}: every value must be >= {low:g}")
    return values


def input_sizes(text: str | None) -> tuple[int | None, ...]:
    if text is None:
        return (None,)
    sizes = parse_list(text, "--input-size", int, 0)
    if any(0 < s < 8 for s in sizes):
        raise UserError(f"--input-size {text!r}: sizes must be >= 8 pixels (0: the patch size)")
    return tuple(None if s == 0 else s for s in sizes)


def parse_modes(text: str) -> tuple[str, ...]:
    """`--mode`: a comma-separated list of protocol modes, "both" = freeze,finetune."""
    from hpcsrl.eval.protocol import MODES

    modes = tuple(dict.fromkeys(m for part in text.split(",") if part.strip()
                                for m in (("freeze", "finetune") if part.strip() == "both"
                                          else (part.strip(),))))
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UserError(f"--mode {text!r}: choose from {', '.join(MODES)} or both")
    return modes


def resolve_eval_split(args: argparse.Namespace, ckpt: dict, log):
    """The split to evaluate on: --split, else the one the checkpoint was pre-trained with,
    else OUT/split.json (drawn when absent). A checkpoint pre-trained on the pool of another
    split is refused: that pool overlaps this test part."""
    from hpcsrl.data.splits import Layout, resolve_split

    trained = (ckpt.get("data") or {}).get("split") if ckpt else None
    path = args.split
    if path is None and trained and trained.get("path") and Path(trained["path"]).is_file():
        path = trained["path"]
    split = resolve_split(path or Path(args.out) / "split.json", Layout.read(args.data),
                          split_options(args))
    if ckpt and trained is None:
        log.warning("WARNING: %s records no split: it was pre-trained on every patch of its "
                    "file, test patches included", args.checkpoint)
    elif trained and trained.get("pretrain_on") == "all":
        log.warning("WARNING: %s was pre-trained on all patches (--pretrain-on all): the test "
                    "part's images (not labels) were seen in pre-training", args.checkpoint)
    elif trained and trained.get("digest") != split.digest():
        raise UserError(f"{args.checkpoint} was pre-trained on the pool of split "
                        f"{trained.get('path')} (digest {trained.get('digest')}), not of "
                        f"{split.path} (digest {split.digest()}): its pool overlaps this test "
                        "part; pass --split with the checkpoint's split")
    return split, ("every patch (checkpoint without split)" if ckpt and trained is None
                   else (trained or {}).get("pretrain_on", "-"))


def _load_checkpoint(args: argparse.Namespace):
    """(model, checkpoint dict) or (None, {}) with --random-init; foreign files -> UserError."""
    if args.random_init:
        return None, {}
    from hpcsrl.models.registry import model_from_checkpoint

    return model_from_checkpoint(args.checkpoint)


def _check_bands(ckpt: dict, ds, args: argparse.Namespace) -> None:
    """The data's bands must be the ones the encoder was pre-trained on (count and names)."""
    want = ckpt["config"].get("in_channels")
    names = ckpt.get("band_names")
    if want is not None and want != ds.channels:
        raise UserError(f"{args.checkpoint} was pre-trained on {want} bands but --bands "
                        f"{ds.bands} gives {ds.channels}: pass the band set it was trained on "
                        f"({ckpt.get('pretrain', {}).get('bands', '?')})")
    if names and list(names) != list(ds.band_names):
        raise UserError(f"{args.checkpoint} was pre-trained on bands {','.join(names)} but "
                        f"--bands {ds.bands} reads {','.join(ds.band_names)}")


def _encoders(args: argparse.Namespace, model, ckpt: dict, channels: int, log) -> dict:
    """{name: encoder}: the checkpoint's encoder and its random-init twin (or only the latter)."""
    import torch

    from hpcsrl.models.registry import build_method, model_from_config

    encoders = {}
    if model is not None:
        config = ckpt["config"]
        name = str(config["method"])
        encoders[name] = model.encoder
        log.info("checkpoint %s: %s / %s after %s epoch(s)", args.checkpoint, name,
                 config.get("backbone"), ckpt.get("epoch", "?"))
    if args.random_init or not args.no_random_floor:
        torch.manual_seed(args.seed)
        twin = (model_from_config(ckpt["config"]) if model is not None
                else build_method(args.method, args.backbone, channels, **shape_options(args)))
        encoders["random-init"] = twin.encoder
    for enc in encoders.values():
        enc.eval()
    return encoders


def run(args: argparse.Namespace) -> int:
    log = get_logger("hpcsrl.evaluate")
    fractions = parse_fractions(args.label_fractions)
    if not args.random_init and not args.checkpoint:
        raise UserError("--checkpoint DIR/checkpoint.pt is required (or use --random-init)")
    if not args.random_init and not Path(args.checkpoint).is_file():
        raise UserError(f"--checkpoint {args.checkpoint}: no such file")
    epochs = parse_list(args.epochs, "--epochs", int, 1)
    decays = parse_list(args.weight_decay, "--weight-decay", float, 0.0)
    modes = parse_modes(args.mode)
    stages = parse_list(args.probe_stages, "--probe-stages", int, 1)
    sizes = input_sizes(args.input_size)
    for opt in ("batch_size", "threads", "tsne_points"):
        if getattr(args, opt) < 1:
            raise UserError(f"--{opt.replace('_', '-')} must be >= 1")
    if args.finetune_epochs is not None and args.finetune_epochs < 1:
        raise UserError("--finetune-epochs must be >= 1")
    if args.bn_samples < 0:
        raise UserError("--bn-samples must be >= 0")
    if args.max_samples is not None and args.max_samples < 2:
        raise UserError("--max-samples must be >= 2")

    import torch

    from hpcsrl.data import PatchDataset
    from hpcsrl.eval.protocol import EvalSpec, LabelledData, is_multilabel, run_protocol
    from hpcsrl.eval.report import format_table
    from hpcsrl.eval.train import FitConfig
    from hpcsrl.fileio import write_json
    from hpcsrl.precision import check_precision

    torch.set_num_threads(args.threads)
    model, ckpt = _load_checkpoint(args)
    bands = args.bands or ckpt.get("pretrain", {}).get("bands")
    if not bands:
        raise UserError("--bands is required (rgb, s2-10m, s2, s1 or s1s2)")
    ds = PatchDataset(args.data, bands=bands)
    if not ds.has_labels and (ds.multi_hot is None or not ds.multi_hot.any()):
        raise UserError(f"{args.data}: the file has no labels (dataset 'label' is absent or all "
                        "-1); evaluation needs a labelled patch file")
    labels = np.asarray(ds.labels, dtype=np.int64)
    names = list(ds.class_names) or [f"class_{i}" for i in range(int(labels.max()) + 1)]
    if ds.multi_hot is not None and not names:
        names = [f"class_{i}" for i in range(ds.multi_hot.shape[1])]
    if labels.max() >= len(names):
        raise UserError(f"{args.data}: label {labels.max()} but only {len(names)} class_names")
    if model is not None:
        _check_bands(ckpt, ds, args)
    encoders = _encoders(args, model, ckpt, ds.channels, log)

    fit = FitConfig(epochs=max(epochs), finetune_epochs=args.finetune_epochs,
                    batch_size=args.batch_size, lr=args.lr,
                    encoder_lr=args.encoder_lr, weight_decay=decays[0], seed=args.seed,
                    augment=not args.no_augment, finetune_head=args.finetune_head,
                    progress=not args.quiet,
                    precision=check_precision(args.precision))
    spec = EvalSpec(modes=modes, fractions=fractions, seed=args.seed,
                    max_samples=args.max_samples, knn_floor=not args.no_knn_floor,
                    tsne=not args.no_tsne, tsne_points=args.tsne_points, input_sizes=sizes,
                    probe_weight_decays=decays, probe_epochs=epochs, probe_stages=stages,
                    bn_samples=args.bn_samples, fit=fit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split, pretrained_on = resolve_eval_split(args, ckpt, log)
    multi = ds.multi_hot if is_multilabel(ds.multi_hot) else None
    config = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    write_json(out / "eval_config.json", {**config, "bands": ds.bands,
                                          "class_names": names, "multilabel": multi is not None,
                                          "split": split.record(),
                                          "checkpoint_pretrained_on": pretrained_on})
    log.info("%s: %d labelled patches, %d classes, bands %s; modes %s; fractions %s",
             args.data, int((labels >= 0).sum()), len(names), ds.bands, ",".join(modes),
             ",".join(f"{f:g}" for f in fractions))
    t0 = time.perf_counter()
    data = LabelledData(lambda idx: ds.read_batch(idx)[0], labels, names, multi)
    rows = run_protocol(data, encoders, spec, out, log, split=split)
    print(format_table(rows))
    log.info("report: %s (%.0f s)", out / "report.csv", time.perf_counter() - t0)
    return 0
