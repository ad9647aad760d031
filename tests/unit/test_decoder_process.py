"""JPEG Lossless is decoded by GDCM in a child process: what it returns, and what an abort, a
hang or a refusal there costs (one file, never the process that asked)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames

from dicom_ai.dicom import decoder_process
from dicom_ai.dicom.decoder_process import DecoderProcess
from dicom_ai.dicom.errors import PixelDecodeError
from dicom_ai.dicom.io import read_header
from dicom_ai.dicom.model import Instance
from dicom_ai.dicom.pixels import decode_file, decode_pixels

CORPUS = Path(__file__).parents[2].parent / "shared" / "data" / "dicom"
#: JPEG Lossless SV1, 8-bit RGB; JPEG Lossless (Process 14), 16 bits allocated, 12 stored.
RGB_SV1 = CORPUS / "pydicom_test_files" / "SC_rgb_jpeg_gdcm.dcm"
GREY_P14 = CORPUS / "pylibjpeg-data" / "JPEGLossless" / "JPEGLossless_1s_1f_u_16_12.dcm"

pytestmark = pytest.mark.skipif(not RGB_SV1.is_file() or not GREY_P14.is_file(),
                                reason="corpus not present")


@pytest.fixture
def child() -> Iterator[DecoderProcess]:
    process = DecoderProcess()
    yield process
    process.close()


def _instance(path: Path) -> Instance:
    return Instance(path, read_header(path))


def _blocking_file(tmp_path: Path) -> Path:
    # Opening a FIFO for reading waits for a writer: a decode that never ends, on demand.
    fifo = tmp_path / "fifo.dcm"
    os.mkfifo(fifo)
    return fifo


def _wait_for_reader(fifo: Path) -> None:
    """Return once a process has the FIFO open for reading (the child is inside its decode)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            return
        except OSError:
            time.sleep(0.01)
    raise AssertionError("the decoder process never opened the file")


@pytest.mark.parametrize("path", [RGB_SV1, GREY_P14], ids=["SV1 RGB", "P14 16-bit"])
def test_jpeg_lossless_decodes_in_the_child_as_gdcm_decodes_it_here(path: Path) -> None:
    decoded = decode_pixels(_instance(path))
    here = decode_file(path, in_decoder_process=True)
    assert decoder_process.pid() not in (None, os.getpid())
    assert decoded.array.dtype == here.array.dtype
    assert np.array_equal(decoded.array, here.array)
    assert decoded.photometric_interpretation == here.photometric_interpretation
    ds = pydicom.dcmread(path)
    assert decoded.array.shape[:2] == (ds.Rows, ds.Columns)


def test_gdcm_never_decodes_in_the_process_that_asked() -> None:
    with pytest.raises(PixelDecodeError) as refused:
        decode_file(RGB_SV1)
    assert refused.value.reason == (
        "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value "
        "1]) is decoded in the decoder process only")


def test_a_refusal_in_the_child_is_the_files_reason_and_the_child_lives_on(
        child: DecoderProcess, tmp_path: Path) -> None:
    ds = pydicom.dcmread(RGB_SV1)
    # The codestream cut after its headers: GDCM raises, it does not abort.
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:700]])
    cut = tmp_path / "cut.dcm"
    ds.save_as(cut)
    child.decode(RGB_SV1, None, timeout_s=60)
    first = child.pid
    with pytest.raises(PixelDecodeError) as refused:
        child.decode(cut, None, timeout_s=60)
    assert refused.value.reason.startswith("cannot decode JPEG Lossless")
    assert "\n" not in refused.value.reason
    assert child.pid == first
    assert child.decode(RGB_SV1, None, timeout_s=60)[0].shape == (ds.Rows, ds.Columns, 3)


def test_a_child_killed_mid_decode_costs_that_file_only(child: DecoderProcess,
                                                         tmp_path: Path) -> None:
    fifo = _blocking_file(tmp_path)
    child.decode(RGB_SV1, None, timeout_s=60)
    first = child.pid
    assert first is not None

    def abort_when_inside() -> None:
        _wait_for_reader(fifo)
        os.kill(first, signal.SIGABRT)

    killer = threading.Thread(target=abort_when_inside)
    killer.start()
    with pytest.raises(PixelDecodeError) as refused:
        child.decode(fifo, None, timeout_s=60)
    killer.join()
    assert refused.value.reason.startswith(
        "the decoder process was killed by SIGABRT while decoding the image")
    assert refused.value.path == fifo
    array, photometric = child.decode(RGB_SV1, None, timeout_s=60)
    assert child.pid not in (None, first)
    assert photometric == "RGB" and array.shape[-1] == 3


def test_a_decode_past_its_time_limit_stops_the_child(child: DecoderProcess,
                                                      tmp_path: Path) -> None:
    fifo = _blocking_file(tmp_path)
    child.decode(RGB_SV1, None, timeout_s=60)
    first = child.pid
    started = time.monotonic()
    with pytest.raises(PixelDecodeError) as refused:
        child.decode(fifo, None, timeout_s=0.5)
    assert 0.5 <= time.monotonic() - started < 10
    assert refused.value.reason == (
        "decoding took longer than limits.isolated_decode_timeout_s (0.5 s); the decoder "
        "process was stopped")
    assert child.pid is None
    assert first is not None and not Path(f"/proc/{first}").exists()
    child.decode(RGB_SV1, None, timeout_s=60)
    assert child.pid not in (None, first)


def test_a_child_that_died_between_files_is_replaced(child: DecoderProcess) -> None:
    expected, _ = child.decode(GREY_P14, None, timeout_s=60)
    first = child.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    # Reaped here, so that the child is gone before the next request (Popen copes).
    os.waitpid(first, 0)
    array, _ = child.decode(GREY_P14, None, timeout_s=60)
    assert np.array_equal(array, expected)
    assert child.pid != first


def test_a_child_that_dies_after_it_was_found_alive_costs_no_file(
        child: DecoderProcess, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The child ends between the parent's check that it runs and the request (the race of a
    kill between files): the file is decoded by a fresh child, not refused for that death."""
    expected, _ = child.decode(GREY_P14, None, timeout_s=60)
    first = child.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    os.waitpid(first, 0)
    # The check comes first and finds the child alive: the death falls after it.
    monkeypatch.setattr(subprocess.Popen, "poll", lambda self: None)
    with caplog.at_level(logging.WARNING, logger=decoder_process.__name__):
        array, _ = child.decode(GREY_P14, None, timeout_s=60)
    assert np.array_equal(array, expected)
    assert child.pid not in (None, first)
    assert [r.getMessage() for r in caplog.records] == [
        "decoder process exited with code 0 before it took a request; starting a fresh one"]


def test_a_child_that_cannot_take_a_file_is_the_reason_after_one_fresh_try(
        child: DecoderProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "dicom_ai" / "dicom"
    broken.mkdir(parents=True)
    for package in (tmp_path / "dicom_ai", broken):
        (package / "__init__.py").write_text("")
    (broken / "decoder_process.py").write_text("raise SystemExit('no decoder here')\n")
    # The child runs ``-m`` from its working directory first: this copy of the module exits.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PixelDecodeError) as refused:
        child.decode(GREY_P14, None, timeout_s=60)
    assert refused.value.reason == (
        "the decoder process exited with code 1 before it could take the file, twice: "
        "no decoder here")


def test_the_child_ends_when_its_parent_closes_the_pipe(child: DecoderProcess) -> None:
    child.decode(GREY_P14, None, timeout_s=60)
    first = child.pid
    child.close()
    assert child.pid is None
    assert first is not None and not Path(f"/proc/{first}").exists()
