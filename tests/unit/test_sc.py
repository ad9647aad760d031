"""Secondary Capture: the pure picture composition, then the DICOM object."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_ai.results.sc import (
    MARKER_COLOR,
    _font,
    banner_text,
    build_secondary_capture,
    orientation_letters,
    overlay_heatmap,
    patient_orientation,
    render,
    upscale_factor,
    wrap_text,
)
from tests import results_fixtures as fx

BANNER = banner_text("cxr-pneumonia", "1.0.0")


def is_banner_yellow(pixels: np.ndarray) -> np.ndarray:
    return (pixels[..., 0] > 200) & (pixels[..., 1] > 200) & (pixels[..., 2] < 80)


def test_banner_text() -> None:
    assert BANNER == "AI GENERATED — NOT FOR DIAGNOSTIC USE — cxr-pneumonia 1.0.0"


def test_overlay_weights_colour_by_heat() -> None:
    rgb = np.full((1, 2, 3), 100.0)
    heat = np.array([[0.0, 1.0]])
    out = overlay_heatmap(rgb, heat, alpha=0.4)
    # heat 0 leaves the image; heat 1: 0.6·100 + 0.4·jet(1)·255, jet(1) = (0.5, 0, 0).
    assert out[0, 0].tolist() == [100.0, 100.0, 100.0]
    assert out[0, 1].tolist() == pytest.approx([60.0 + 0.4 * 127.5, 60.0, 60.0])


def test_overlay_rejects_mismatched_heatmap() -> None:
    with pytest.raises(ValueError, match="heatmap shape"):
        overlay_heatmap(np.zeros((4, 4, 3)), np.zeros((2, 2)))


def test_upscale_factor() -> None:
    assert upscale_factor((28, 28)) == pytest.approx(512 / 28)
    assert upscale_factor((100, 50)) == pytest.approx(512 / 50)
    assert upscale_factor((600, 800)) == 1.0


def test_small_image_is_enlarged_and_banner_is_burned_above_it() -> None:
    image = np.full((28, 28), 90, dtype=np.uint8)
    out = render(image, None, banner=BANNER, caption="referable DR p=0.400")
    assert out.dtype == np.uint8 and out.shape[1] == 512 and out.shape[2] == 3
    grey = np.all(out == 90, axis=-1)
    rows = np.nonzero(grey.all(axis=1))[0]
    top, bottom = rows.min(), rows.max()
    assert bottom - top + 1 == 512  # the whole image, unobscured
    assert is_banner_yellow(out[:top]).sum() > 200  # banner text is drawn above the image
    assert not grey[:top].any()
    caption = out[bottom + 1:]
    assert (caption > 200).all(axis=-1).sum() > 100  # white caption text below


def test_heatmap_tints_only_where_heat_is() -> None:
    image = np.full((600, 600), 50, dtype=np.uint8)
    heat = np.zeros((600, 600), dtype=np.float32)
    heat[100:200, 100:200] = 1.0
    out = render(image, heat, banner=BANNER, caption="x")
    top = np.nonzero(np.all(out == 50, axis=-1).any(axis=1))[0].min()
    body = out[top:top + 600]
    assert body[400, 400].tolist() == [50, 50, 50]
    assert body[150, 150].tolist() != [50, 50, 50]


def test_markers_are_drawn_in_scaled_coordinates() -> None:
    image = np.zeros((64, 64), dtype=np.uint8)
    out = render(image, None, banner=BANNER, caption="x", markers=[(8, 8, 24, 24)])
    scale = 512 / 64
    marked = np.all(out == np.array(MARKER_COLOR, dtype=np.uint8), axis=-1)
    rows, cols = np.nonzero(marked)
    assert cols.min() == pytest.approx(8 * scale, abs=1)
    assert cols.max() == pytest.approx(24 * scale - 1, abs=1)
    assert rows.max() - rows.min() == pytest.approx(16 * scale - 1, abs=1)


def test_wrap_text_fits_the_width() -> None:
    font = _font(16)
    lines = wrap_text(BANNER, font, 200)
    assert len(lines) > 1
    assert " ".join(lines) == BANNER
    assert all(font.getlength(line) <= 200 for line in lines)


@pytest.mark.parametrize(("vector", "letter"), [
    ((1.0, 0.0, 0.0), "L"), ((-1.0, 0.0, 0.0), "R"), ((0.0, 0.95, -0.31), "P"),
    ((0.0, -1.0, 0.0), "A"), ((0.0, 0.0, 1.0), "H"), ((0.1, 0.0, -0.9), "F"),
])
def test_orientation_letters(vector: tuple[float, float, float], letter: str) -> None:
    assert orientation_letters(vector) == letter


def test_patient_orientation_from_header() -> None:
    ds = Dataset()
    assert patient_orientation(ds) is None
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    assert patient_orientation(ds) == ("L", "P")
    ds.PatientOrientation = ["A", "F"]
    assert patient_orientation(ds) == ("A", "F")


def test_secondary_capture_object() -> None:
    result = fx.dx_result()
    source = result.series.instances[0]
    sc = build_secondary_capture(result.explanations[0], result, fx.settings(), index=0)
    assert sc.BurnedInAnnotation == "YES"
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    assert sc.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sc.StudyInstanceUID == source.header.StudyInstanceUID
    assert sc.SeriesInstanceUID != source.header.SeriesInstanceUID
    ref = sc.SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == source.SOPClassUID
    assert "AI" in sc.SeriesDescription and "not for diagnostic use" in sc.SeriesDescription
    assert sc.BodyPartExamined == source.header.BodyPartExamined
    assert list(sc.PatientOrientation) == list(source.header.PatientOrientation)
    assert (str(sc.SeriesDate), str(sc.ContentDate)) == ("20261129", "20261129")
    pixels = sc.pixel_array
    assert is_banner_yellow(pixels[:20]).any()
    again = build_secondary_capture(result.explanations[0], result, fx.settings(), index=0)
    assert again.SOPInstanceUID == sc.SOPInstanceUID


def test_unknown_orientation_and_laterality_are_left_empty() -> None:
    result = fx.fundus_result()
    sc = build_secondary_capture(result.explanations[0], result, fx.settings(), index=0)
    assert sc.PatientOrientation in (None, "", [])
    assert "Laterality" in sc and not sc.Laterality
    assert min(sc.Rows, sc.Columns) >= 512


def test_caption_carries_the_impression_in_a_language_the_font_can_draw() -> None:
    from dicom_ai.results.sc import caption_text, renderable

    result = fx.dx_result()
    shown = result.explanations[0]
    caption = caption_text(shown, result, "en")
    assert caption.startswith(f"{shown.caption}. AI-drafted impression — not for diagnostic use.")
    assert "pneumonia suggested" in caption
    # DejaVu has no CJK glyphs: a Chinese caption would burn in as boxes, so it stays English.
    assert not renderable("肺炎")
    assert caption_text(shown, result, "zh") == caption


def test_empty_laterality_of_a_paired_body_part_stays_empty() -> None:
    result = fx.dx_result()
    source = result.series.instances[0].header
    source.BodyPartExamined, source.Laterality = "HAND", ""
    if "ImageLaterality" in source:
        del source.ImageLaterality
    sc = build_secondary_capture(result.explanations[0], result, fx.settings(), index=0)
    assert sc.BodyPartExamined == "HAND"
    assert sc.Laterality == ""
