"""Command-line entry points of the service: ``serve``, ``status``, ``retry``, ``reprocess``,
``config check``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from dicom_ai.config import SettingsError, load_settings
from dicom_ai.logs import configure_logging


def _cmd_serve(args: argparse.Namespace) -> int:
    from dicom_ai.service.server import Service, ServiceError

    settings = load_settings(args.config)
    # The command line's --log-level wins over the settings; the format is the settings'.
    configure_logging(getattr(args, "log_level", None) or settings.log_level,
                      fmt=settings.log_format)
    try:
        return Service(settings).run()
    except ServiceError as exc:
        print(f"dicom-ai serve: {exc}", file=sys.stderr)
        return 1


def _cmd_status(args: argparse.Namespace) -> int:
    from dicom_ai.service import db
    from dicom_ai.service.status import render

    settings = load_settings(args.config)
    if getattr(args, "study", None) is not None:
        from dicom_ai.service.status import show_trail

        return show_trail(Path(settings.storage.directory), args.study, as_json=args.json)
    if getattr(args, "json", False):
        print(f"dicom-ai status: --json exports one study's audit trail; give its STUDY_UID (every "
              f"study's trail is a file under {Path(settings.storage.directory) / 'audit'})",
              file=sys.stderr)
        return 2
    path = Path(settings.storage.directory) / "index.sqlite"
    if not path.is_file():
        print(f"no index at {path}: the service has not run with this storage directory",
              file=sys.stderr)
        return 1
    conn = db.connect(path)
    try:
        sys.stdout.write(render(conn))
    finally:
        conn.close()
    return 0


def _cmd_retry(args: argparse.Namespace) -> int:
    from dicom_ai.service import db
    from dicom_ai.service.export import retry_dead

    settings = load_settings(args.config)
    path = Path(settings.storage.directory) / "index.sqlite"
    if not path.is_file():
        print(f"no index at {path}", file=sys.stderr)
        return 1
    conn = db.connect(path)
    try:
        count = retry_dead(conn, time.time(), args.destination,
                           audit_root=Path(settings.storage.directory))
    finally:
        conn.close()
    print(f"{count} dead letter(s) queued again; the running service sends them on its next round")
    return 0


def _cmd_reprocess(args: argparse.Namespace) -> int:
    from dicom_ai.dicom.uid import is_valid_uid
    from dicom_ai.service import db
    from dicom_ai.service.studies import ReprocessRefused, reprocess

    if not is_valid_uid(args.study):
        print("dicom-ai reprocess: STUDY_UID is not a valid UID", file=sys.stderr)
        return 2
    settings = load_settings(args.config)
    root = Path(settings.storage.directory)
    if not (root / "index.sqlite").is_file():
        print(f"no index at {root / 'index.sqlite'}", file=sys.stderr)
        return 1
    conn = db.connect(root / "index.sqlite")
    try:
        generation, left = reprocess(conn, args.study, time.time(), audit_root=root)
    except ReprocessRefused as exc:
        print(f"dicom-ai reprocess: {args.study}: {exc.reason}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    was = "it had no job" if left == "none" else f"its job was {left}"
    print(f"study {args.study} generation {generation} queued ({was}); the service analyses "
          "it next (a stopped one when it starts)")
    return 0


def _cmd_config_check(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.file)
    except SettingsError as exc:
        for problem in exc.problems:
            print(f"{args.file}: {problem}", file=sys.stderr)
        print(f"{args.file}: {len(exc.problems)} problem(s)", file=sys.stderr)
        return 1
    scp = settings.scp
    print(f"{args.file}: ok")
    print(f"  listener  {scp.ae_title} on {scp.bind_address}:{scp.port}"
          f"{' TLS' if scp.tls.enabled else ''}"
          f"{' mutual-TLS' if scp.tls.require_client_cert else ''}; callers: "
          f"{', '.join(scp.allowed_calling_aets) or 'any'}")
    print(f"  storage   {settings.storage.directory} (refuse below "
          f"{settings.storage.minimum_free_mb} MB free)")
    studies = settings.studies
    print(f"  complete  MPPS, manifest or expected count at once; else quiet "
          f"{studies.single_image_quiet_period_s:g} s (single-image) / "
          f"{studies.quiet_period_s:g} s; at most {studies.maximum_wait_s:g} s")
    worker = settings.worker
    print(f"  workers   {worker.processes or 'sized from the machine'}, priority "
          f"{worker.priority}{', listener keeps a CPU' if worker.listener_core else ''}; "
          f"{worker.max_attempts} attempts, a job stopped after {worker.job_timeout_s:g} s")
    web = settings.http
    print("  http      " + (f"{web.bind_address}:{web.port} (/metrics /healthz /readyz, status "
                             f"page{' with token' if web.token else ''})"
                             if web.enabled else "off"))
    for dest in settings.export.destinations:
        where = dest.url if dest.kind == "stow" else f"{dest.ae_title}@{dest.host}:{dest.port}"
        print(f"  export    {dest.name}: {dest.kind} {where}{' TLS' if dest.tls.enabled else ''}")
    if not settings.export.destinations:
        print("  export    none configured: results stay under storage/outputs")
    if not Path(settings.inference.models_dir).is_dir():
        print(f"  warning   models directory {settings.inference.models_dir} does not exist")
    return 0


def add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register ``serve``, ``status``, ``retry``, ``reprocess`` and ``config check`` on the
    ``dicom-ai`` parser."""
    p = subparsers.add_parser("serve", help="receive studies over DICOM, analyse them and send "
                              "results back (runs until SIGTERM)")
    p.add_argument("--config", required=True, help="settings TOML file")
    p.set_defaults(func=_cmd_serve)

    p = subparsers.add_parser("status", help="studies, jobs and outbound queue of the service")
    p.add_argument("--config", default=None, help="settings TOML file (default: defaults and "
                   "DICOM_AI_* environment)")
    p.add_argument("study", nargs="?", default=None, metavar="STUDY_UID",
                   help="show this study's audit trail (received, complete, analysed, sent, "
                   "acknowledged...) instead of the overview")
    p.add_argument("--json", action="store_true", help="with STUDY_UID: the trail as JSON lines "
                   "(one event per line, for export)")
    p.set_defaults(func=_cmd_status)

    p = subparsers.add_parser("retry", help="send dead-lettered results again (after fixing the "
                              "destination)")
    p.add_argument("--config", default=None, help="settings TOML file")
    p.add_argument("--destination", default=None, help="only this destination (default: all)")
    p.set_defaults(func=_cmd_retry)

    p = subparsers.add_parser("reprocess", help="analyse a received study again (after a "
                              "failure was fixed, or with upgraded models)")
    p.add_argument("study", metavar="STUDY_UID", help="the study, as `dicom-ai status` lists it")
    p.add_argument("--config", default=None, help="settings TOML file")
    p.set_defaults(func=_cmd_reprocess)

    p = subparsers.add_parser("config", help="configuration tools")
    sub = p.add_subparsers(dest="config_command", required=True)
    c = sub.add_parser("check", help="validate a settings file and say what is wrong")
    c.add_argument("file", help="settings TOML file")
    c.set_defaults(func=_cmd_config_check)
