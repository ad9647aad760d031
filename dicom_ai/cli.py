"""The ``dicom-ai`` command: replay, serve, status, config check, train, evaluate, models."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from dicom_ai import DISCLAIMER, __version__
from dicom_ai.config import Settings, SettingsError, load_settings
from dicom_ai.logs import configure_logging


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None))


def _cmd_replay(args: argparse.Namespace) -> int:
    from dicom_ai.pipeline import load_models
    from dicom_ai.replay import EXIT_CANNOT_RUN, print_table, replay

    settings = _settings(args)
    folder = Path(args.folder)
    if not folder.exists():
        print(f"error: {folder} does not exist", file=sys.stderr)
        return EXIT_CANNOT_RUN
    models_dir = Path(args.models or settings.inference.models_dir)
    models, problems = load_models(settings.inference, models_dir)
    for problem in problems:
        print(f"warning: model not loaded: {problem}", file=sys.stderr)
    if not models:
        print(f"error: no usable model bundle under {models_dir}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    report = replay(folder, Path(args.out), models, settings, progress=not args.quiet)
    print_table(report.outcomes, report.entries)
    print(f"results in {args.out}/ (replay-summary.json, <study>/findings.json)")
    return report.exit_status


def _cmd_models(args: argparse.Namespace) -> int:
    from dicom_ai.pipeline import load_models

    settings = _settings(args)
    models, problems = load_models(settings.inference, Path(args.models or
                                                           settings.inference.models_dir))
    selected = [m for m in models if args.name in (None, m.name)]
    if args.action == "inspect":
        if not selected:
            print(f"error: no model named {args.name!r}", file=sys.stderr)
            return 1
        for m in selected:
            print(json.dumps({"name": m.name, "version": m.version, "device_uid": m.info.device_uid,
                              "root": str(m.root), "dicom_ai": m.dicom_ai}, indent=2))
        return 0
    for m in selected:
        print(f"{m.name:<16} {m.version:<8} {m.task:<15} "
              f"{','.join(m.dicom_ai['accepts']['modality']):<12} {m.root}")
    for problem in problems:
        print(f"not loaded: {problem}")
    return 0 if not problems else 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command registered."""
    from dicom_ai.service.commands import add_commands as add_service_commands
    from dicom_ai.train.commands import add_commands as add_train_commands

    parser = argparse.ArgumentParser(prog="dicom-ai", description=f"dicom-ai {__version__}: AI "
                                     f"results for PACS studies. {DISCLAIMER}.")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: "
                        "settings log_level)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("replay", help="run the pipeline over DICOM files in a folder")
    p.add_argument("folder", help="folder searched recursively for DICOM files")
    p.add_argument("--out", default="out/replay", help="output folder (default: out/replay)")
    p.add_argument("--models", default=None, help="models directory (default: settings)")
    p.add_argument("--config", default=None, help="settings TOML file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_replay)

    p = sub.add_parser("models", help="list or inspect installed model bundles")
    p.add_argument("action", choices=["list", "inspect"])
    p.add_argument("name", nargs="?", default=None)
    p.add_argument("--models", default=None, help="models directory (default: settings)")
    p.add_argument("--config", default=None, help="settings TOML file")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=lambda _args: print(f"dicom-ai {__version__}") or 0)

    add_service_commands(sub)
    add_train_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dicom-ai`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # A replay's product is its table and files, so it logs warnings only unless asked; the
    # service logs its activity.
    configure_logging(args.log_level or ("INFO" if args.command == "serve" else "WARNING"))
    try:
        return int(args.func(args))
    except SettingsError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
