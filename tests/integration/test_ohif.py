"""Our results in the reference web viewer: OHIF Viewer 3.13 on Orthanc's DICOMweb, in Chromium.

What a radiologist does, done by a browser: ``dicom-ai replay sample_studies`` runs once (and
once more on a lateral chest film, whose only SR says it was not analysed); the
sample studies and everything it wrote go into Orthanc (with its DICOMweb plugin); OHIF's
prebuilt ``dist/`` (npm ``@ohif/app``, no build) is served on one origin with ``/dicom-web``
forwarded to Orthanc; Debian's headless Chromium, driven by npm ``playwright-core``
(``ohif/drive.mjs``), opens each study that has results, double-clicks each SR in the study
panel and steps through its findings with the viewport's next arrow, then double-clicks each SEG
and each image series.

Asserted: every series has a thumbnail and ours say "not for diagnostic use"; source images and
Secondary Captures render; SEGs load as segmentations; the page and its console report no error;
each positive finding of ``findings.json`` is drawn on its image with its name and probability in
a label a reader can read (wholly inside the viewport, overlapping no other label); the arrows
reach every finding OHIF read. Two upstream limits of OHIF 3.13.2 are tolerated, each only with
its own evidence: the VOI LUT Function bug (see :func:`_known_upstream`) and SOP classes OHIF
does not know (dermoscopy). Screenshots of a chest X-ray, a fundus and the CT result go to
``$OHIF_TEST_SCREENSHOTS`` (``docs/`` for the README's) or the test's temp dir;
``$OHIF_TEST_REPLAY`` names an existing replay output to view instead of a fresh replay (not
``DICOM_AI_*``: the settings loader refuses unknown variables with that prefix).

npm packages are installed once into ``~/.cache/dicom-ai/ohif`` (``$XDG_CACHE_HOME``), checked
against pinned integrity hashes. Needs ``node``/``npm``, ``/usr/bin/chromium``, Orthanc and the
DICOMweb plugin (``bash scripts/bootstrap.sh test`` installs them).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from ohif.viewer_server import serve_viewer
from orthanc import DICOMWEB_PLUGIN, end_with_this_process, orthanc_available, start_orthanc
from pydicom.uid import generate_uid

from dicom_ai.cli import main

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "sample_studies"
DRIVER_DIR = Path(__file__).resolve().parent / "ohif"
CHROMIUM = Path("/usr/bin/chromium")

OHIF_PACKAGE = "@ohif/app@3.13.2"
#: ``dist.integrity`` of the package on the npm registry (``npm view @ohif/app@3.13.2``).
OHIF_INTEGRITY = ("sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq"
                  "+jd5xXZB9E8EA==")
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dicom-ai" / "ohif"

#: Bound on every single wait in the browser (page load, a series rendering, an SR loading).
STEP_TIMEOUT_S = 30
#: Bound on the whole browser session over all studies; the driver stops waiting and reports
#: this much earlier than the process is killed.
BROWSER_BUDGET_S = 360
BROWSER_KILL_S = BROWSER_BUDGET_S + 60

#: Studies whose screenshots illustrate the README, by sample folder.
SCREENSHOTS = {"cxr04": "ohif-cxr.png", "fundus03": "ohif-fundus.png",
               "ct-lung-pet-ct-dx-a0002": "ohif-ct.png", "fracture01": "ohif-fracture.png"}

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not orthanc_available() or not DICOMWEB_PLUGIN.exists(),
                       reason="Orthanc with its DICOMweb plugin needed"),
    pytest.mark.skipif(not CHROMIUM.exists() or shutil.which("npm") is None,
                       reason="/usr/bin/chromium and node/npm needed"),
]


def _npm(*args: str, cwd: Path) -> None:
    subprocess.run(["npm", *args, "--no-audit", "--no-fund", "--loglevel=error"], cwd=cwd,
                   check=True, timeout=600, stdout=subprocess.DEVNULL)


def _integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def install_ohif(cache: Path) -> Path:
    """OHIF's prebuilt ``dist/``, unpacked once from the npm tarball into ``cache``.

    Returns
    -------
    Path
        The ``dist`` folder.
    """
    dist = cache / OHIF_PACKAGE.replace("/", "_") / "package" / "dist"
    if (dist / "index.html").is_file():
        return dist
    staging = cache / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _npm("pack", OHIF_PACKAGE, "--pack-destination", str(staging), cwd=staging)
    (tarball,) = staging.glob("*.tgz")
    assert _integrity(tarball) == OHIF_INTEGRITY, f"{tarball.name} does not match its pin"
    with tarfile.open(tarball) as archive:
        archive.extractall(staging / "unpacked", filter="data")
    # Renamed into place only when complete, so an interrupted install is redone next time.
    dist.parent.parent.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dist.parent.parent, ignore_errors=True)
    (staging / "unpacked").rename(dist.parent.parent)
    shutil.rmtree(staging)
    return dist


def install_driver(cache: Path) -> Path:
    """``playwright-core`` as locked in ``ohif/package-lock.json``, installed with ``npm ci``.

    Returns
    -------
    Path
        The ``node_modules`` folder.
    """
    home = cache / "driver"
    lock = (DRIVER_DIR / "package-lock.json").read_bytes()
    installed = home / "node_modules" / ".package-lock.json"
    if installed.is_file() and (home / "package-lock.json").read_bytes() == lock:
        return home / "node_modules"
    home.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(DRIVER_DIR / name, home / name)
    _npm("ci", cwd=home)
    return home / "node_modules"


@dataclass
class Report:
    """One SR we wrote: its series and the positive findings it must show."""

    series_instance_uid: str
    positives: list[dict[str, Any]]


@dataclass
class Study:
    """One sample study as planned for the browser and as the browser saw it."""

    folder: str
    study_instance_uid: str
    series: dict[str, str]  # Series Instance UID → Modality
    sop_classes: dict[str, str]  # Series Instance UID → SOP Class UID of the sample files
    reports: list[Report]
    voi_lut_function_sources: set[str]  # source series carrying (0028,1056)
    seen: dict[str, Any] = field(default_factory=dict)


def _read(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def _lateral_study(folder: Path) -> Path:
    """A study of one lateral chest film (the first chest sample, relabelled LL): the chest model
    rejects it and the fracture detector leaves it out, so its only SR is a "not analysed" one,
    which OHIF must open like any other."""
    ds = pydicom.dcmread(SAMPLES / "cxr01" / "1.dcm")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, keyword, generate_uid(entropy_srcs=["ohif-lateral", keyword]))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ViewPosition = "LL"
    (folder / "cxr01-lateral").mkdir(parents=True)
    ds.save_as(folder / "cxr01-lateral" / "1.dcm", enforce_file_format=True)
    return folder


def _plan_studies(out: Path, inputs: list[Path]) -> list[Study]:
    """Each study the replay wrote results for, with its input files' series and ours."""
    sources: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for root in inputs:
        for path in sorted(root.rglob("*.dcm")):
            ds = _read(path)
            sources.setdefault(str(ds.StudyInstanceUID), []).append((path, ds))
    studies = []
    for document_path in sorted(out.glob("*/findings.json")):
        document = json.loads(document_path.read_text())
        uid = document["study_instance_uid"]
        originals = sources[uid]
        series = {str(ds.SeriesInstanceUID): str(ds.Modality) for _, ds in originals}
        reports = []
        for result in document["results"]:
            for name in result.get("outputs", []):
                written = _read(document_path.parent / name)
                series[str(written.SeriesInstanceUID)] = str(written.Modality)
                if written.Modality == "SR":
                    positives = [f for f in result["findings"] if f.get("positive")]
                    reports.append(Report(str(written.SeriesInstanceUID), positives))
        if not reports and len(series) == len({str(ds.SeriesInstanceUID) for _, ds in originals}):
            continue  # nothing of ours to look at (no model took the study)
        voi = {str(ds.SeriesInstanceUID) for _, ds in originals if "VOILUTFunction" in ds}
        folder = originals[0][0].parent.name
        sop_classes = {str(ds.SeriesInstanceUID): str(ds.SOPClassUID) for _, ds in originals}
        studies.append(Study(folder, uid, series, sop_classes, reports, voi))
    return studies


@functools.cache
def _ohif_knows(sop_class_uid: str) -> bool:
    """True when OHIF's bundles name the SOP class at all (its SOP class dictionary and handlers
    are in them); a class they never mention cannot be displayed by this OHIF."""
    needles = [f"{q}{sop_class_uid}{q}".encode() for q in "'\""]
    return any(n in js.read_bytes() for js in install_ohif(CACHE).glob("*.js") for n in needles)


def _placeable(study: Study) -> list[Report]:
    """The study's SRs, unless OHIF supports none of its source SOP classes (dermoscopy in OHIF
    3.13): then it cannot place any finding on an image, and waiting for that is wasted time."""
    return study.reports if any(_ohif_knows(c) for c in study.sop_classes.values()) else []


def _browser_plan(studies: list[Study], base_url: str, node_modules: Path,
                  work: Path, shots: Path) -> dict[str, Any]:
    plan_studies = []
    for study in studies:
        shot = SCREENSHOTS.get(study.folder)
        reports = _placeable(study)
        plan_studies.append({
            "studyInstanceUID": study.study_instance_uid,
            "seriesCount": len(study.series),
            # A sample whose SOP class OHIF does not support (dermoscopy) cannot render there.
            "images": [{"seriesInstanceUID": s} for s, m in study.series.items()
                       if m not in ("SR", "SEG") and (s not in study.sop_classes
                                                      or _ohif_knows(study.sop_classes[s]))],
            "segmentations": [{"seriesInstanceUID": s} for s, m in study.series.items()
                              if m == "SEG"],
            # The screenshot shows that report as it opens (its first finding's image).
            "reports": [{"seriesInstanceUID": r.series_instance_uid,
                         "screenshot": str(shots / shot) if shot and i == 0 else None}
                        for i, r in enumerate(reports)],
        })
    user_data = work / "chromium-profile"
    user_data.mkdir()
    return {"baseUrl": base_url, "chromium": str(CHROMIUM), "userDataDir": str(user_data),
            "nodeModules": str(node_modules), "timeoutMs": STEP_TIMEOUT_S * 1000,
            "budgetMs": BROWSER_BUDGET_S * 1000,
            "studies": plan_studies}


def _run_browser(plan: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    plan_path, result_path = work / "plan.json", work / "seen.json"
    plan_path.write_text(json.dumps(plan, indent=1))
    with (work / "drive.log").open("wb") as log:
        subprocess.run(["node", str(DRIVER_DIR / "drive.mjs"), str(plan_path), str(result_path)],
                       stdout=log, stderr=subprocess.STDOUT, timeout=BROWSER_KILL_S,
                       check=True, preexec_fn=end_with_this_process)
    seen: list[dict[str, Any]] = json.loads(result_path.read_text())
    return seen


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Study]]:
    dist, node_modules = install_ohif(CACHE), install_driver(CACHE)
    work = tmp_path_factory.mktemp("ohif")
    # An existing replay's output can be viewed instead of a fresh run (to look at SR changes
    # without waiting for the models); CI never sets it.
    out = Path(os.environ.get("OHIF_TEST_REPLAY") or work / "replay")
    inputs = [SAMPLES]
    if "OHIF_TEST_REPLAY" not in os.environ:
        inputs.append(_lateral_study(work / "extra"))
        for folder in inputs:
            assert main(["replay", str(folder), "--out", str(out), "--models",
                         str(REPO / "models"), "--quiet"]) == 0
    planned = _plan_studies(out, inputs)
    shots = Path(os.environ.get("OHIF_TEST_SCREENSHOTS") or work / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    with start_orthanc(work / "orthanc") as pacs:
        for path in [*(p for root in inputs for p in sorted(root.rglob("*.dcm"))),
                     *sorted(out.rglob("*.dcm"))]:
            pacs.upload(path)
        with serve_viewer(dist, pacs.http_port) as server:
            plan = _browser_plan(planned, server.url, node_modules, work, shots)
            seen = _run_browser(plan, work)
    for study, result in zip(planned, seen, strict=True):
        study.seen = result
    yield planned


def _known_upstream(study: Study, error: str) -> bool:
    """True for the one OHIF 3.13.2 bug our files do not cause: a source image carrying VOI LUT
    Function (0028,1056). ``@cornerstonejs/dicom-image-loader`` takes ``voiLUTFunction[0]`` of
    the string OHIF's metadata provider hands it ("L" for "LINEAR") and the viewport throws
    "Invalid VOI LUT function". Our outputs never carry the attribute."""
    return bool(study.voi_lut_function_sources) and (
        "Invalid VOI LUT function" in error
        or ("IMAGE_LOAD_ERROR" in error and "handler is not a function" in error))


def _probability_text(p: float) -> str:
    # OHIF prints a NUM with two decimals (Number(v).toFixed(2)); our TEXT lines do the same.
    return f"{p:.2f}"


def _name_pattern(finding: dict[str, Any]) -> re.Pattern[str]:
    name = str(finding.get("display") or finding["label"]).replace("_", " ")
    return re.compile(r"\b" + r"\s+".join(map(re.escape, name.split())) + r"\b", re.IGNORECASE)


def test_studies_open_with_every_series_and_our_disclaimer(studies: list[Study]) -> None:
    for study in studies:
        seen = study.seen
        assert "fatal" not in seen, (study.folder, seen.get("fatal"))
        assert len(seen["thumbnails"]) == len(study.series), (study.folder, seen["thumbnails"])
        ours = [t for t in seen["thumbnails"] if t.split(" | ")[0] in ("SR", "OT", "SEG")]
        assert ours, (study.folder, seen["thumbnails"])
        for thumbnail in ours:
            assert "not for diagnostic use" in thumbnail, (study.folder, thumbnail)


def test_source_images_and_secondary_captures_render(studies: list[Study]) -> None:
    for study in studies:
        for image in study.seen["images"]:
            uid = image["seriesInstanceUID"]
            if image["rendered"]:
                continue
            # Tolerated only on a source carrying the attribute, with the error naming the bug.
            assert uid in study.voi_lut_function_sources, (study.folder, study.series[uid], image)
            assert any(_known_upstream(study, e) for e in study.seen["errors"]), study.folder


def _viewable_reports(study: Study) -> list[tuple[Report, dict[str, Any]]]:
    """The study's SRs with what the browser saw (only those of :func:`_placeable`)."""
    return list(zip(_placeable(study), study.seen["reports"], strict=True))


def test_segmentations_load(studies: list[Study]) -> None:
    for study in studies:
        for seg in study.seen.get("segmentations", []):
            assert seg["loaded"] and seg["segments"] > 0, (study.folder, seg)


def test_no_error_in_the_page_or_its_console(studies: list[Study]) -> None:
    problems: dict[str, list[str]] = {}
    for study in studies:
        errors = [e for e in study.seen["errors"] if not _known_upstream(study, e)]
        if errors or study.seen["http"]:
            problems[study.folder] = [e[:600] for e in errors] + study.seen["http"]
    assert not problems, json.dumps(problems, indent=1)


def test_each_positive_finding_is_shown_with_its_probability(studies: list[Study]) -> None:
    missing: dict[str, list[str]] = {}
    for study in studies:
        for report, seen in _viewable_reports(study):
            assert seen.get("measurements"), (study.folder, seen.get("error"))
            assert all(m["loaded"] for m in seen["measurements"]), (study.folder,
                                                                    seen["measurements"])
            texts = [t for step in seen["steps"] for t in step["texts"]]
            shown = "\n".join(texts)
            for finding in report.positives:
                if not (_name_pattern(finding).search(shown)
                        and _probability_text(finding["probability"]) in shown):
                    missing.setdefault(study.folder, []).append(
                        f"{finding['label']} {finding['probability']:.2f} not in {texts}")
    assert not missing, json.dumps(missing, indent=1)


def test_arrows_step_through_every_finding(studies: list[Study]) -> None:
    for study in studies:
        for _, seen in _viewable_reports(study):
            measurements = seen.get("measurements") or []
            assert measurements, (study.folder, seen.get("error"))
            steps = [s for s in seen["steps"] if "measurement" in s]
            # One step per finding, the last one back round to the first.
            assert [s["measurement"] for s in steps] == \
                [*range(1, len(measurements)), 0], (study.folder, steps)
            for step in steps:
                assert step["reached"], (study.folder, step)
                # A group with labels shows them (OHIF draws none for a TID 1410 region with
                # only a comment, e.g. "not analysed").
                if measurements[step["measurement"]]["labels"]:
                    assert step["texts"], (study.folder, step)


def test_a_report_that_says_not_analysed_opens(studies: list[Study]) -> None:
    if "OHIF_TEST_REPLAY" in os.environ:
        pytest.skip("the lateral film is replayed only by a fresh replay")
    (lateral,) = [s for s in studies if s.folder == "cxr01-lateral"]
    ((report, seen),) = _viewable_reports(lateral)
    assert report.positives == [] and seen.get("measurements"), seen.get("error")
