"""Every object we write passes dicom3tools, PixelMed and renders with DCMTK (real peers).

Results are built from the real files of ``sample_studies/`` (chest X-rays, ophthalmic
photographs, a CT series) with findings constructed here (classifications, boxes, CT candidates
with a segmentation, one below its operating point, a rejection). For each study: ``dciodvfy``
on every output reports no line containing "Error", ``dcentvfy`` over the source and the outputs
none either, PixelMed's ``DicomInstanceValidator`` (every object) and ``DicomSRValidator`` (the
SR, against TID 1500 and its context groups) report no error, and ``dsr2html`` renders the SR
with each finding's line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_ai.inference.findings import ModelResult
from dicom_ai.results import build_outputs, output_filename
from dicom_ai.results.impression import finding_line
from tests import results_fixtures as fx

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("dciodvfy") is None or shutil.which("dcentvfy") is None
                       or shutil.which("dsr2html") is None,
                       reason="dicom3tools (dciodvfy, dcentvfy) and DCMTK dsr2html needed"),
]

ENV = {**os.environ, "TCP_NODELAY": "1"}
PIXELMED = Path("/usr/share/java/pixelmed.jar")
#: Java 17 refuses PixelMed's stylesheets without lifting the XPath operator limits.
JAVA = ["java", "-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0",
        "-Djdk.xml.xpathTotalOpLimit=0", "-cp", str(PIXELMED)]


def sample(relative: str) -> Path:
    return fx.data_path(relative, root=fx.SAMPLES)


STUDIES: dict[str, Callable[[], ModelResult]] = {
    "cxr02-cr-monochrome1": lambda: fx.dx_result(path=sample("cxr02/1.dcm")),
    "cxr03-dx-j2k": lambda: fx.dx_result(path=sample("cxr03/1.dcm")),
    "cxr04-boxes": lambda: fx.fracture_result(path=sample("cxr04/1.dcm")),
    "fundus01-op-rgb": lambda: fx.fundus_result(path=sample("fundus01/1.dcm")),
    "fundus02-op-ybr": lambda: fx.fundus_result(path=sample("fundus02/1.dcm")),
    "ct-a0002": lambda: fx.ct_result(sorted(sample("ct-lung-pet-ct-dx-a0002").glob("*.dcm"))),
    "cxr01-rejected": lambda: fx.rejected_result(path=sample("cxr01/1.dcm")),
}


def run(*args: str | Path) -> str:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=ENV,
                          timeout=120, check=False)
    return done.stdout + done.stderr


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "Error" in line]


def pixelmed_errors(validator: str, path: Path) -> list[str]:
    if shutil.which("java") is None or not PIXELMED.exists():
        pytest.skip("PixelMed (Debian libpixelmed-java) and java needed")
    return error_lines(run(*JAVA, f"com.pixelmed.validate.{validator}", path))


@pytest.mark.parametrize("study", list(STUDIES))
def test_outputs_validate_and_render(study: str, tmp_path: Path) -> None:
    result = STUDIES[study]()
    settings = fx.settings(uid_root="1.2.826.0.1.3680043.10.1", institution_name="Test")
    site = fx.RETINA if study.startswith("fundus") else fx.LUNG
    paths = []
    for ds in build_outputs([result], settings, codes=fx.CODES, finding_site=site):
        path = tmp_path / output_filename(ds)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    kinds = [p.name.split("-", 1)[0] for p in paths]
    assert kinds == (["sr"] if result.status == "rejected"
                     else ["sc", "seg", "sr"] if study.startswith("ct") else ["sc", "sr"])
    for path in paths:
        assert error_lines(run("dciodvfy", path)) == [], path.name
        assert pixelmed_errors("DicomInstanceValidator", path) == [], path.name
    assert pixelmed_errors("DicomSRValidator", paths[-1]) == []
    sources = [i.path for i in result.series.instances]
    assert error_lines(run("dcentvfy", *sources, *paths)) == []
    html = tmp_path / "sr.html"
    out = run("dsr2html", "+Rd", "+Cm", paths[-1], html)
    assert html.exists(), out
    text = html.read_text(encoding="utf-8", errors="replace")
    assert "AI generated — not for diagnostic use" in text
    assert "AI-drafted impression — not for diagnostic use" in text
    if result.status == "rejected":
        assert "not analysed" in text
    for finding in result.findings:
        # dsr2html prints a NUM item as "<value> <unit meaning>", and our line for it.
        # Candidates below the operating point have no group (findings.json keeps them).
        if finding.below_operating_point:
            assert finding_line(finding) not in text
        elif finding.probability is not None:
            assert f"{finding.to_json()['probability']} no units" in text
            assert finding_line(finding) in text


@pytest.mark.parametrize("language", ["en", "zh"])
def test_analysed_and_rejected_in_one_sr_validate(language: str, tmp_path: Path) -> None:
    """A frontal film analysed and a second film rejected: one SR with both, in each language."""
    results = [fx.dx_result(path=sample("cxr04/1.dcm")),
               fx.rejected_result(path=sample("cxr01/1.dcm"))]
    settings = fx.settings(language=language)
    sr = build_outputs(results, settings, codes=fx.CODES, finding_site=fx.LUNG)[-1]
    path = tmp_path / output_filename(sr)
    sr.save_as(path, enforce_file_format=True)
    assert error_lines(run("dciodvfy", path)) == []
    assert pixelmed_errors("DicomInstanceValidator", path) == []
    assert pixelmed_errors("DicomSRValidator", path) == []
