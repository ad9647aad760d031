"""Process-wide logging set-up that keeps patient identity out of log output.

Our own messages name files, UIDs and reasons, never patient name, ID or birth date. Third-party
libraries are less careful: pydicom's validation warnings quote the offending element value and
highdicom warns about "unlikely person names" quoting the name. Their records are therefore
raised to ERROR, and Python warnings (which print the message verbatim to stderr) are routed
through logging and dropped below that level.
"""

from __future__ import annotations

import logging
import sys
import traceback
import warnings
from pathlib import Path

#: Libraries whose warnings may quote element values (and so patient identity).
VALUE_QUOTING_LOGGERS = ("pydicom", "highdicom", "pynetdicom.dsutils")
#: Libraries that narrate routine work at INFO (pynetdicom: several lines per association of the
#: exporter); our own lines say what matters, so theirs start at WARNING.
CHATTY_LOGGERS = ("pynetdicom",)


def configure_logging(level: str = "INFO", *, process: str = "") -> None:
    """Configure the root logger on stderr and silence value-quoting third-party warnings.

    Parameters
    ----------
    level:
        Root level name.
    process:
        For a service child process: its name, put with its PID in every line.
    """
    prefix = f"{process}[%(process)d] " if process else ""
    logging.basicConfig(level=level.upper(), stream=sys.stderr, force=True,
                        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    for name in VALUE_QUOTING_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
    warnings.simplefilter("default")


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
