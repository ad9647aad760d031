"""Every object we write passes dicom3tools and renders with DCMTK (real peers, no mocks).

Results are built from the real files of ``sample_studies/`` (chest X-rays, ophthalmic
photographs, a CT series) with findings constructed here. For each study: ``dciodvfy`` on every
output reports no line containing "Error", ``dcentvfy`` over the source and the outputs reports
none either, and ``dsr2html`` renders the SR.
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
from tests import results_fixtures as fx

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("dciodvfy") is None or shutil.which("dcentvfy") is None
                       or shutil.which("dsr2html") is None,
                       reason="dicom3tools (dciodvfy, dcentvfy) and DCMTK dsr2html needed"),
]

ENV = {**os.environ, "TCP_NODELAY": "1"}


def sample(relative: str) -> Path:
    return fx.data_path(relative, root=fx.SAMPLES)


STUDIES: dict[str, Callable[[], ModelResult]] = {
    "cxr02-cr-monochrome1": lambda: fx.dx_result(path=sample("cxr02/1.dcm")),
    "cxr03-dx-j2k": lambda: fx.dx_result(path=sample("cxr03/1.dcm")),
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
    assert len(paths) == (1 if result.status == "rejected" else 2)
    for path in paths:
        assert error_lines(run("dciodvfy", path)) == [], path.name
    sources = [i.path for i in result.series.instances]
    assert error_lines(run("dcentvfy", *sources, *paths)) == []
    html = tmp_path / "sr.html"
    out = run("dsr2html", "+Rd", "+Cm", paths[-1], html)
    assert html.exists(), out
    text = html.read_text(encoding="utf-8", errors="replace")
    assert "AI generated — not for diagnostic use" in text
    if result.status == "rejected":
        assert "Not analysed" in text
    for finding in result.findings:
        # dsr2html prints a NUM item as "<value> <unit meaning>".
        if finding.probability is not None:
            assert f"{finding.to_json()['probability']} no units" in text
