"""No patient identity in any log line, whatever the import order and the level.

pydicom quotes the values it finds invalid (``Invalid value for VR UI: 'PID-8675309.1961'``) and
resets its logger to WARNING when it is imported, so lowering its level is not enough: the
filter on the root handler must take the values out. Each test runs in a fresh interpreter, so
that "pydicom imported after the logging set-up" really happens; the levels are set up one after
the other in it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian

from tests.bundles import write_bundle
from tests.identity import NUMBER_VRS, TEXT_VRS, leaks, plant

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SAMPLE_CXR = REPO / "sample_studies" / "cxr01" / "1.dcm"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

#: Every path by which a value reaches a log record: pydicom's own reader and its validation
#: warnings, our reader, the listener's fallback parse (the element walk gives up on Implicit VR
#: bytes under an Explicit VR syntax), third-party records at every level, a Python warning,
#: and a traceback of a library exception quoting a value.
SCRIPT = r"""
import logging, sys, warnings
from pathlib import Path
order, planted, implicit = sys.argv[1:4]
if order == "pydicom-first":
    import pydicom
from dicom_ai.logs import configure_logging
configure_logging("DEBUG")
import pydicom
from dicom_ai.dicom.errors import DicomInputError
from dicom_ai.dicom.io import read_header
from dicom_ai.service.spool import parse_dataset_keys

for level in ("DEBUG", "INFO", "WARNING", "ERROR"):
    configure_logging(level)
    print(f"=== {level}", file=sys.stderr, flush=True)
    ds = pydicom.dcmread(planted)
    for elem in ds.iterall():
        str(elem.value)
    try:
        read_header(Path(planted))
    except DicomInputError as exc:
        logging.getLogger("dicom_ai.test").warning("refused: %s", exc)
    try:
        parse_dataset_keys(Path(implicit).read_bytes(), "1.2.840.10008.1.2.1")
    except DicomInputError as exc:
        logging.getLogger("dicom_ai.test").warning("refused: %s", exc)
    for name in ("pydicom", "highdicom", "pynetdicom", "pydicom.valuerep"):
        for lvl in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
            logging.getLogger(name).log(lvl, "Invalid value for VR PN: %r", "Zzqx^Yyvw")
            logging.getLogger(name).log(lvl, f'Value "{"PID-8675309"}" is not valid [1961-07-04]')
    warnings.warn("Invalid value for VR DA: '19610704'", UserWarning)
    try:
        int("1961-07-04")
    except ValueError:
        logging.getLogger("dicom_ai.test").exception("conversion failed")
print("done", file=sys.stderr)
"""


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if not SAMPLE_CXR.exists():
        pytest.skip("sample_studies not built")
    folder = tmp_path_factory.mktemp("planted")
    ds = plant(plant(pydicom.dcmread(SAMPLE_CXR), TEXT_VRS), NUMBER_VRS)
    path = folder / "planted.dcm"
    ds.save_as(path)
    keys = pydicom.Dataset()
    keys.SOPClassUID = ds.SOPClassUID
    plant(keys, {"StudyInstanceUID": ("UI", "PID-8675309.1961")})
    keys.SeriesInstanceUID = ds.SeriesInstanceUID
    keys.SOPInstanceUID = ds.SOPInstanceUID
    implicit = folder / "implicit.bin"
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = True, True
    write_dataset(buffer, keys)
    implicit.write_bytes(buffer.getvalue())
    return path, implicit


@pytest.mark.parametrize("order", ["logging-first", "pydicom-first"])
def test_no_identity_at_any_level_in_either_import_order(planted: tuple[Path, Path],
                                                         order: str) -> None:
    run = subprocess.run([sys.executable, "-c", SCRIPT, order, *map(str, planted)],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stderr.rstrip().endswith("done")
    sections = dict(part.split("\n", 1) for part in run.stderr.split("=== ")[1:])
    assert set(sections) == set(LEVELS)
    for level, text in sections.items():
        assert leaks(text) == [], (level, text[-3000:])
    # The records were written, with their values taken out, not silently lost.
    warning = sections["WARNING"]
    assert "Invalid value for VR PN: '…'" in warning
    assert "refused: planted.dcm: invalid value for VR DS in (0010,1030)" in warning
    assert "refused: StudyInstanceUID is not a valid UID" in warning
    assert "ValueError: invalid literal for int() with base 10: '…'" in warning


@pytest.mark.parametrize("level", [None, "DEBUG"])
def test_replay_logs_no_identity(planted: tuple[Path, Path], tmp_path: Path,
                                 level: str | None) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    text_only = plant(pydicom.dcmread(SAMPLE_CXR), TEXT_VRS)
    text_only.save_as(folder / "text.dcm")
    numbers = pydicom.dcmread(planted[0])
    numbers.SOPInstanceUID = numbers.SOPInstanceUID + ".2"
    numbers.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    numbers.save_as(folder / "numbers.dcm")
    models = tmp_path / "models"
    write_bundle(models)
    argv = [*(["--log-level", level] if level else []), "replay", str(folder), "--out",
            str(tmp_path / "out"), "--models", str(models), "--quiet"]
    run = subprocess.run([sys.executable, "-c",
                          "import sys; from dicom_ai.cli import main; sys.exit(main(sys.argv[1:]))",
                          *argv], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 2, run.stderr[-3000:]  # numbers.dcm fails, text.dcm is analysed
    assert "1 processed, 0 skipped, 1 failed" in run.stdout
    assert leaks(run.stdout + run.stderr) == [], run.stderr[-3000:]
