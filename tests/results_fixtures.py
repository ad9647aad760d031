"""Model results built from real DICOM files, for the tests of ``dicom_ai.results``.

The files come from ``../shared/data/dicom`` (public test corpora, see its ``INDEX.tsv``); tests
skip when the folder is absent. Findings are constructed here; the explanation pictures are
the real decoded pixels of the source instances.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest

from dicom_ai.config import OutputSettings
from dicom_ai.dicom.model import Instance, Series
from dicom_ai.imaging.xray import presentation_from_dataset
from dicom_ai.inference.findings import (
    CandidateMask,
    Explanation,
    Finding,
    ModelInfo,
    ModelResult,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "dicom"
SAMPLES = REPO / "sample_studies"
DX_FILE = "highdicom/dx_image.dcm"
CT_DIR = "dcm_qa_ct/GE"
RGB_FILE = "pydicom-data/SC_rgb.dcm"
STARTED = datetime(2026, 11, 29, 12, 30, 15, tzinfo=UTC)

PNEUMONIA = {"value": "233604007", "scheme": "SCT", "meaning": "Pneumonia"}
NODULE = {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"}
REFERABLE_DR = {"value": "4855003", "scheme": "SCT", "meaning": "Diabetic retinopathy"}
LUNG = {"value": "39607008", "scheme": "SCT", "meaning": "Lung"}
RETINA = {"value": "5665001", "scheme": "SCT", "meaning": "Retina"}
FRACTURE = {"value": "125605004", "scheme": "SCT", "meaning": "Fracture of bone"}
HAND = ("85562004", "SCT", "Hand")
CODES = {"pneumonia": PNEUMONIA, "nodule": NODULE, "referable_dr": REFERABLE_DR,
         "fracture": FRACTURE}


def data_path(relative: str, root: Path = DATA) -> Path:
    """Path of a corpus file; skips the calling test when the data is not there."""
    path = root / relative
    if not path.exists():
        pytest.skip(f"test data not available: {path}")
    return path


def instance(path: Path) -> Instance:
    return Instance(path=path, header=pydicom.dcmread(path, stop_before_pixels=True))


def series_of(paths: list[Path]) -> Series:
    instances = [instance(p) for p in paths]
    return Series(series_instance_uid=str(instances[0].header.SeriesInstanceUID),
                  instances=instances)


def model(name: str = "cxr-pneumonia", version: str = "1.0.0",
          device_uid: str = "2.25.123456789") -> ModelInfo:
    return ModelInfo(name=name, version=version, device_uid=device_uid)


def settings(**kwargs: object) -> OutputSettings:
    return OutputSettings(**kwargs)  # type: ignore[arg-type]


def gaussian_heatmap(shape: tuple[int, int], center: tuple[float, float],
                     sigma: float) -> npt.NDArray[np.float32]:
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    d2 = (rows - center[0]) ** 2 + (cols - center[1]) ** 2
    heat: npt.NDArray[np.float32] = np.exp(-d2 / (2 * sigma**2)).astype(np.float32)
    return heat


def display(path: Path) -> npt.NDArray[np.uint8]:
    """The decoded image as uint8 for display: grey through the DICOM grayscale pipeline,
    colour as RGB (pydicom converts YBR)."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        rgb: npt.NDArray[np.uint8] = np.asarray(pixels, dtype=np.uint8)
        return rgb
    unit = presentation_from_dataset(pixels, ds)
    grey: npt.NDArray[np.uint8] = np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)
    return grey


def classification_result(path: Path, info: ModelInfo, findings: list[Finding],
                          caption: str) -> ModelResult:
    """One image, classified, with a heatmap over its decoded pixels."""
    series = series_of([path])
    image = display(path)
    heat = gaussian_heatmap(image.shape[:2], (image.shape[0] * 0.4, image.shape[1] * 0.6),
                            max(image.shape[:2]) / 10)
    return ModelResult(series=series, model=info, status="ok", started=STARTED,
                       findings=findings,
                       explanations=[Explanation(source=series.instances[0], image=image,
                                                 heatmap=heat, caption=caption)])


def dx_result(version: str = "1.0.0", path: Path | None = None) -> ModelResult:
    """A chest radiograph classified as pneumonia (operating point 0.54), with one heatmap."""
    path = path or data_path(DX_FILE)
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    return classification_result(
        path, model(version=version),
        [Finding("pneumonia", probability=0.8734567891, positive=True, operating_point=0.54,
                 image_uid=uid),
         Finding("normal", probability=0.1265432109, positive=False, image_uid=uid)],
        "pneumonia p=0.873 (positive)")


def fracture_result(path: Path | None = None) -> ModelResult:
    """A radiograph with an image-level fracture score and two boxes, one of them below its
    operating point (the shape of the ``xr-fracture`` model's findings)."""
    path = path or data_path(DX_FILE)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    uid = str(header.SOPInstanceUID)
    rows, cols = int(header.Rows), int(header.Columns)
    box = (cols * 0.25, rows * 0.30, cols * 0.45, rows * 0.55)
    faint = (cols * 0.6, rows * 0.6, cols * 0.7, rows * 0.7)
    result = classification_result(
        path, model("xr-fracture", "0.1.0", "2.25.777"),
        [Finding("fracture", probability=0.91, positive=True, operating_point=0.5,
                 image_uid=uid),
         Finding("fracture", probability=0.83, positive=True, operating_point=0.3,
                 image_uid=uid, bbox_px=box),
         Finding("fracture", probability=0.12, positive=False, operating_point=0.3,
                 image_uid=uid, bbox_px=faint),
         Finding("multiple_fractures", positive=True, image_uid=uid, site=HAND)],
        "fracture p=0.91 (positive)")
    shown = result.explanations[0]
    scale = shown.image.shape[0] / rows
    result.explanations[0] = Explanation(
        source=shown.source, image=shown.image, heatmap=shown.heatmap, caption=shown.caption,
        markers=(tuple(round(v * scale) for v in (box[1], box[0], box[3], box[2])),))  # type: ignore[arg-type]
    return result


def ct_result(paths: list[Path] | None = None) -> ModelResult:
    """A real CT series with lung quantities and one localized candidate."""
    series = series_of(paths or sorted(data_path(CT_DIR).glob("*.dcm")))
    key = series.instances[len(series.instances) // 2]
    image = display(key.path)
    heat = gaussian_heatmap(image.shape[:2], (200.0, 300.0), 25)
    k = series.instances.index(key)
    near = series.instances[k - 1:k + 2]
    slices = tuple(i.SOPInstanceUID for i in near)
    rows, cols = int(key.header.Rows), int(key.header.Columns)
    pixels = np.zeros((len(near), rows, cols), dtype=bool)
    pixels[:, 190:212, 288:312] = True
    pixels[0, 190:195] = pixels[2, 207:212] = False
    return ModelResult(
        series=series, model=model("ct-lung", "0.3.1", "2.25.987654321"), status="ok",
        started=STARTED,
        findings=[
            Finding("lung_volume_left_ml", value=2345.678912, unit="mL"),
            Finding("mean_lung_density_hu", value=-845.12345, unit="[hnsf'U]"),
            Finding("laa950_percent", value=7.25, unit="%"),
            Finding("nodule", probability=0.712345678, positive=True, operating_point=0.6,
                    center_mm=(12.3456, -40.5, 100.25), extent_mm=(8.0, 6.5, 9.25),
                    slices=slices, image_uid=key.SOPInstanceUID,
                    bbox_px=(280.0, 180.0, 320.0, 220.0),
                    mask=CandidateMask(slices=slices, pixels=pixels)),
            Finding("nodule", probability=0.45, positive=False, operating_point=0.6,
                    center_mm=(-60.0, 10.0, 100.25), extent_mm=(5.0, 5.0, 4.0),
                    slices=slices[1:2], image_uid=slices[1],
                    bbox_px=(100.0, 300.0, 112.0, 312.0)),
        ],
        explanations=[Explanation(source=key, image=image, heatmap=heat,
                                  caption="nodule candidate p=0.712",
                                  markers=((180, 280, 220, 320),))])


def fundus_result(path: Path | None = None) -> ModelResult:
    """A colour photograph (by default a small 100×100 RGB file) graded for referable DR."""
    return classification_result(
        path or data_path(RGB_FILE), model("fundus-dr", "2.0.0", "2.25.555"),
        [Finding("referable_dr", probability=0.4, positive=False)],
        "referable DR p=0.400 (negative)")


def rejected_result(path: Path | None = None) -> ModelResult:
    """An image rejected before any finding (out of distribution)."""
    return ModelResult(series=series_of([path or data_path(DX_FILE)]), model=model(),
                       status="rejected",
                       started=STARTED,
                       reason="input out of distribution (Mahalanobis 41.2 > 30.0)")
