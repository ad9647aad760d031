"""Process-wide logging set-up that keeps patient identity out of log output.

Our own messages name files, UIDs and reasons, never patient name, ID or birth date. Third-party
libraries are less careful: pydicom's validation warnings quote the offending element value
(``Invalid value for VR PN: 'Doe^Jane'``) and highdicom warns about "unlikely person names"
quoting the name. Lowering their loggers' levels is not enough on its own: importing pydicom
resets its logger to WARNING, whenever that import happens. The guarantee is therefore
structural: :class:`IdentityFilter` sits on the root handler, which every record reaches
whatever the logger's level and whenever a library was imported, and takes quoted, bracketed and
hex-dumped values out of every record that is not ours (and out of every traceback, ours
included). Python warnings are routed through logging, so they pass the same filter.

Two line formats (``log_format``): ``text``, one readable line per record, and ``json``, one
JSON object per line (:class:`JsonFormatter`) for a log collector. The filter runs before either
formatter, so both carry the same redacted message and traceback.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from datetime import UTC, datetime
from pathlib import Path

#: Libraries whose warnings may quote element values (and so patient identity).
VALUE_QUOTING_LOGGERS = ("pydicom", "highdicom", "pynetdicom.dsutils")
#: Libraries that narrate routine work at INFO (pynetdicom: several lines per association of the
#: exporter); our own lines say what matters, so theirs start at WARNING.
CHATTY_LOGGERS = ("pynetdicom",)
#: Our own loggers: their messages are identity-free by contract and are kept as written.
OWN_LOGGER = "dicom_ai"
#: What stands in for a value taken out of a message.
REDACTED = "…"

# A quoted value ('x', "x", b'x', with escapes), a bracketed value as pynetdicom and pydicom's
# dataset dumps print them, and a line of a hex dump (pydicom's debug reader: offset, then bytes,
# then the same bytes as ASCII). An apostrophe inside a word ("can't") opens no quote, and a
# traceback's File "path" is kept.
_QUOTED = re.compile(r"""
    (?<!\w) b?'(?:[^'\\\n]|\\.)*'              # 'value' or b'value'
  | (?<!\w)(?<!File\ ) b?"(?:[^"\\\n]|\\.)*"   # "value", not a traceback's File "path"
  | \[[^\]\n]*\]                              # [value]
""", re.VERBOSE)
_HEX_DUMP = re.compile(r"^.*(?:\b[0-9a-fA-F]{2} ){4,}.*$", re.MULTILINE)


def redact_values(text: str) -> str:
    """``text`` with every quoted, bracketed or hex-dumped value replaced by ``…``.

    Libraries quote the values they complain about (pydicom, highdicom, Python's own
    ``int()``/``float()``/``strptime`` messages); what remains says what went wrong and where
    (VRs, tags, lengths, offsets), not what the data holds.

    Parameters
    ----------
    text:
        A log message or an exception's text.

    Returns
    -------
    str
        The text with the values taken out.
    """
    return _QUOTED.sub(lambda m: f"'{REDACTED}'", _HEX_DUMP.sub(REDACTED, text))


class IdentityFilter(logging.Filter):
    """Takes element values out of log records before any handler writes them.

    Records from loggers outside :data:`OWN_LOGGER` get their message redacted by
    :func:`redact_values`; debug records of :data:`VALUE_QUOTING_LOGGERS` (element-by-element
    dumps) are dropped. Every record's traceback is redacted, since an exception raised in a
    library may quote a value even when our message does not.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == OWN_LOGGER or record.name.startswith(OWN_LOGGER + ".")
        if not own:
            if record.levelno <= logging.DEBUG and _quotes_values(record.name):
                return False
            record.msg = redact_values(record.getMessage())
            record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_values(record.exc_text)
        return True


def _quotes_values(name: str) -> bool:
    return any(name == n or name.startswith(n + ".") for n in VALUE_QUOTING_LOGGERS)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC ISO 8601), ``level``, ``logger``, ``message``,
    ``pid``, the service ``process`` name when given, and ``exception`` / ``stack`` when present.

    It formats what :class:`IdentityFilter` left in the record: the message through
    :meth:`~logging.LogRecord.getMessage` and the traceback from ``exc_text``, which the filter
    has already redacted (a traceback is never formatted afresh from ``exc_info`` when the
    filter has written it).

    Parameters
    ----------
    process:
        Name of the service process (``worker``, ``exporter``), or empty.
    """

    def __init__(self, process: str = "") -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime(
                "%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            "pid": record.process,
        }
        if self.process:
            out["process"] = self.process
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_values(self.formatException(record.exc_info))
        if record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str = "INFO", *, process: str = "", fmt: str = "text") -> None:
    """Configure the root logger on stderr, filtered by :class:`IdentityFilter`, and silence
    value-quoting third-party warnings.

    Parameters
    ----------
    level:
        Root level name.
    process:
        For a service child process: its name, put with its PID in every line.
    fmt:
        ``"text"`` or ``"json"`` (:class:`JsonFormatter`), the ``log_format`` setting.
    """
    prefix = f"{process}[%(process)d] " if process else ""
    logging.basicConfig(level=level.upper(), stream=sys.stderr, force=True,
                        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(IdentityFilter())
        if fmt == "json":
            handler.setFormatter(JsonFormatter(process))
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    for name in VALUE_QUOTING_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)


def safe_error_text(exc: BaseException) -> str:
    """One line about a failure that cannot carry patient identity.

    Our own :class:`~dicom_ai.dicom.errors.DicomInputError` reasons are identity-free by
    contract and are kept; any other exception's message may quote element values (pydicom and
    highdicom do), so only its type and where it was raised are kept.
    """
    from dicom_ai.dicom.errors import DicomInputError

    if isinstance(exc, DicomInputError):
        return exc.reason[:300]
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}{where}"


def log_failure(logger: logging.Logger, message: str, exc: BaseException) -> None:
    """Log a caught exception at ERROR: :func:`safe_error_text` and the call stack as
    ``file:line in function`` frames — enough to find the bug, never a value from the data."""
    frames = " <- ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}"
                         for f in reversed(traceback.extract_tb(exc.__traceback__)))
    logger.error("%s: %s [%s]", message, safe_error_text(exc), frames)
