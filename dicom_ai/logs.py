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
import warnings

#: Libraries whose warnings may quote element values (and so patient identity).
VALUE_QUOTING_LOGGERS = ("pydicom", "highdicom", "pynetdicom.dsutils")


def configure_logging(level: str = "INFO") -> None:
    """Configure the root logger on stderr and silence value-quoting third-party warnings."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in VALUE_QUOTING_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
    warnings.simplefilter("default")
