"""Failures are logged with their type and place, never with values from the data; the JSON log
format passes the same identity filter."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_ai.config import SettingsError, load_settings
from dicom_ai.dicom.errors import PixelDecodeError
from dicom_ai.logs import log_failure, safe_error_text

REPO = Path(__file__).resolve().parents[2]


def fail_with_identity() -> None:
    raise ValueError("Unable to convert 'Doe^Jane' born 19700101")


def test_foreign_exception_keeps_type_and_place_only() -> None:
    with pytest.raises(ValueError) as info:
        fail_with_identity()
    text = safe_error_text(info.value)
    assert text.startswith("ValueError at test_logs.py:")
    assert "Doe" not in text


def test_our_reasons_are_kept() -> None:
    assert safe_error_text(PixelDecodeError("pixel data shorter than expected")) == \
        "pixel data shorter than expected"


def test_log_failure_names_the_stack_not_the_message(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError) as info:
        fail_with_identity()
    log_failure(logging.getLogger("dicom_ai.t"), "study 1.2.3 failed", info.value)
    assert "study 1.2.3 failed: ValueError at test_logs.py:" in caplog.text
    assert "in fail_with_identity" in caplog.text
    assert "Doe^Jane" not in caplog.text and "19700101" not in caplog.text


JSON_SCRIPT = r"""
import logging
from dicom_ai.logs import configure_logging
configure_logging("DEBUG", process="worker", fmt="json")
logging.getLogger("pydicom").error("Invalid value for VR PN: %r", "Doe^Jane")
logging.getLogger("dicom_ai.service.t").info("study %s complete", "1.2.3")
try:
    int("19700101x")
except ValueError:
    logging.getLogger("dicom_ai.service.t").exception("conversion failed")
logging.getLogger("dicom_ai.service.t").warning("first line\nsecond line")
"""


def test_json_records_pass_the_identity_filter_one_object_per_line() -> None:
    # A fresh interpreter: configure_logging replaces the root handlers, pytest's included.
    run = subprocess.run([sys.executable, "-c", JSON_SCRIPT], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    records = [json.loads(line) for line in run.stderr.splitlines()]
    assert [(r["logger"], r["level"]) for r in records] == [
        ("pydicom", "ERROR"), ("dicom_ai.service.t", "INFO"), ("dicom_ai.service.t", "ERROR"),
        ("dicom_ai.service.t", "WARNING")]
    assert records[0]["message"] == "Invalid value for VR PN: '…'"
    assert records[1]["message"] == "study 1.2.3 complete"
    assert "ValueError: invalid literal for int() with base 10: '…'" in records[2]["exception"]
    assert records[3]["message"] == "first line\nsecond line"
    for r in records:
        assert r["process"] == "worker" and isinstance(r["pid"], int)
        assert r["time"].endswith("Z")
    assert "Doe" not in run.stderr and "19700101" not in run.stderr


FILTERS_SCRIPT = r"""
import warnings
warnings.filterwarnings("ignore", message="The string .* is unlikely")
before = list(warnings.filters)
from dicom_ai.logs import configure_logging
configure_logging("INFO")
assert warnings.filters == before, warnings.filters[:3]
"""


def test_logging_set_up_keeps_the_callers_warning_filters() -> None:
    # An "ignore" the caller set (pytest's filterwarnings, -W) must keep silencing the
    # name-quoting warnings once replay has set logging up; a filter put in front of it would
    # let them reach pytest's warning summary in the CI log as written.
    run = subprocess.run([sys.executable, "-c", FILTERS_SCRIPT], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]


def test_json_format_is_a_setting_checked_like_the_others() -> None:
    assert load_settings(env={"DICOM_AI_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(SettingsError, match="log_format: one of text, json"):
        load_settings(env={"DICOM_AI_LOG_FORMAT": "xml"})


CHILD_SCRIPT = r"""
import logging, os
from dicom_ai.config import load_settings
from dicom_ai.service.process import child_setup
child_setup(load_settings(env={"DICOM_AI_LOG_FORMAT": "json"}), os.getppid(), "exporter")
logging.getLogger("dicom_ai.service.export").info("pacs: 2 of 2 delivered")
"""


def test_service_child_processes_log_in_the_configured_format() -> None:
    run = subprocess.run([sys.executable, "-c", CHILD_SCRIPT], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    (record,) = [json.loads(line) for line in run.stderr.splitlines()]
    assert (record["process"], record["message"]) == ("exporter", "pacs: 2 of 2 delivered")
