"""Failures are logged with their type and place, never with values from the data."""

from __future__ import annotations

import logging

import pytest

from dicom_ai.dicom.errors import PixelDecodeError
from dicom_ai.logs import log_failure, safe_error_text


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
