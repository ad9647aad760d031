"""``dicom-ai train`` and ``dicom-ai evaluate``: registered on the main CLI by
:func:`add_commands`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

#: Models trained by the classification recipes (:mod:`dicom_ai.train.recipes`), named here
#: without importing torch.
CLASSIFIERS = ("cxr-pneumonia", "fundus-dr", "derm-lesion")
#: The CT model, trained by :mod:`dicom_ai.train.ct_nodules`.
CT_MODEL = "ct-lung"
#: The fracture detector, trained by :mod:`dicom_ai.train.fracture`.
FRACTURE_MODEL = "xr-fracture"

#: Where the training data lives unless ``--data`` or ``DICOM_AI_TRAIN_DATA`` says otherwise.
DEFAULT_DATA = Path("../shared/data")
#: Scratch directory for the normalized image cache (never inside the repository).
DEFAULT_CACHE = Path.home() / ".cache" / "dicom-ai"


def _data_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get("DICOM_AI_TRAIN_DATA") or DEFAULT_DATA)


def _cache_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get("DICOM_AI_TRAIN_CACHE") or DEFAULT_CACHE)


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``train`` and ``evaluate`` on the CLI's subparsers.

    Nothing here imports torch: every ``dicom-ai`` command, the service's listener included,
    builds this parser.
    """
    train = subparsers.add_parser(
        "train", help="train a shipped model and write its MONAI bundle",
        description="Train a model from ../shared/data, calibrate it on validation and write "
                    "the bundle (weights, configs, input-fit statistics).")
    train.add_argument("model", choices=[*CLASSIFIERS, CT_MODEL, FRACTURE_MODEL],
                       help="which model")
    train.add_argument("--epochs", type=int, help="maximum epochs (default: the recipe's)")
    train.add_argument("--out", help="bundle directory (default: models/<model>)")
    train.add_argument("--data", help="data root (default: $DICOM_AI_TRAIN_DATA or "
                                      "../shared/data)")
    train.add_argument("--cache", help="scratch dir for the normalized image cache (default: "
                                       "$DICOM_AI_TRAIN_CACHE or ~/.cache/dicom-ai)")
    train.add_argument("--threads", type=int, default=1,
                       help="torch CPU threads (default 1: the machine is shared)")
    train.add_argument("--init", help="weights a warm-started recipe begins from (checked "
                                      "against the recipe's SHA-256)")
    train.add_argument("--export-only", action="store_true",
                       help="skip training; recalibrate and rewrite the configs from the "
                            "bundle's existing weights")
    train.set_defaults(func=run_train)

    evaluate = subparsers.add_parser(
        "evaluate", help="validation metrics of a bundle with bootstrap CIs and plots",
        description="Print AUC (95%% bootstrap CI), operating point, confusion matrix and ECE "
                    "on the model's validation split; write ROC and calibration PNGs.")
    evaluate.add_argument("model_dir", help="bundle directory, e.g. models/cxr-pneumonia")
    evaluate.add_argument("--plots", help="directory for roc.png and calibration.png")
    evaluate.add_argument("--data", help="data root (default: $DICOM_AI_TRAIN_DATA or "
                                         "../shared/data)")
    evaluate.add_argument("--cache", help="scratch dir for the normalized image cache")
    evaluate.set_defaults(func=run_evaluate)


def run_train(args: argparse.Namespace) -> int:
    """Train (unless ``--export-only``), then export the bundle."""
    if args.model == FRACTURE_MODEL:
        from dicom_ai.train import fracture

        return fracture.main(["--data", str(_data_dir(args.data)),
                              "--cache", str(_cache_dir(args.cache)),
                              "--threads", str(args.threads),
                              "export" if args.export_only else "train",
                              "--out", str(args.out or Path("models") / FRACTURE_MODEL),
                              *(["--epochs", str(args.epochs)]
                                if args.epochs and not args.export_only else []),
                              *(["--init", str(args.init)]
                                if args.init and not args.export_only else [])])
    if args.model == CT_MODEL:
        from dicom_ai.train import ct_nodules

        return ct_nodules.main(["--out", str(args.out or Path("models") / CT_MODEL),
                                "--threads", str(args.threads), "train",
                                "--data", str(_data_dir(args.data) / "ct")])
    from dicom_ai.train.package import export_bundle
    from dicom_ai.train.recipes import RECIPES
    from dicom_ai.train.run import train_model

    recipe = RECIPES[args.model]
    out = Path(args.out or Path("models") / recipe.name)
    data, cache = _data_dir(args.data), _cache_dir(args.cache)
    if not args.export_only:
        train_model(recipe, data_dir=data, cache_dir=cache, out_dir=out, epochs=args.epochs,
                    threads=args.threads, init=Path(args.init) if args.init else None)
    export_bundle(recipe, out, data_dir=data, cache_dir=cache, threads=args.threads)
    print(f"bundle written to {out}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """Recompute validation predictions of a bundle and print the report."""
    import torch

    from dicom_ai.train.evaluate import build_report, format_report, write_plots
    from dicom_ai.train.loop import predict_logits
    from dicom_ai.train.package import load_network
    from dicom_ai.train.recipes import RECIPES
    from dicom_ai.train.run import bundle_recipe, load_splits

    torch.set_num_threads(1)
    bundle = Path(args.model_dir)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    name = meta.get("name")
    if name == FRACTURE_MODEL:
        from dicom_ai.train import fracture

        return fracture.main(["--data", str(_data_dir(args.data)),
                              "--cache", str(_cache_dir(args.cache)), "evaluate", str(bundle)])
    if name not in RECIPES:
        print(f"evaluate knows the validation data of {sorted(RECIPES)}, not {name!r}")
        return 2
    recipe = bundle_recipe(meta)
    _, val = load_splits(recipe, _data_dir(args.data), _cache_dir(args.cache))
    logits = predict_logits(load_network(recipe, bundle), val.images)
    report = build_report(meta, val.labels, logits)
    print(format_report(report))
    if args.plots:
        for path in write_plots(report, val.labels, logits, meta, Path(args.plots)):
            print(f"wrote {path}")
    return 0
