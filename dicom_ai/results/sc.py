"""Secondary Capture: the analysed image with its heatmap, candidate boxes and burned-in banner.

:func:`render` is the pure picture (NumPy in, NumPy out); :func:`build_secondary_capture`
wraps it into a highdicom :class:`~highdicom.sc.SCImage` in the source's study, with
BurnedInAnnotation YES and a Source Image Sequence pointing to the analysed instance.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import matplotlib
import numpy as np
import numpy.typing as npt
from matplotlib.ft2font import FT2Font
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_ai.config import OutputSettings
from dicom_ai.inference.findings import Explanation, ModelResult
from dicom_ai.results.codes import coding_schemes
from dicom_ai.results.equipment import AlgorithmEquipment
from dicom_ai.results.impression import impression
from dicom_ai.results.reference import reference_header
from dicom_ai.results.uids import content_key, derive_uid

UInt8Array = npt.NDArray[np.uint8]
Box = tuple[int, int, int, int]

#: Series Number of our SC series (fixed, so a replay keeps it; the UID carries identity).
SC_SERIES_NUMBER = 9901
BANNER_COLOR = (255, 255, 0)
CAPTION_COLOR = (255, 255, 255)
MARKER_COLOR = (0, 255, 255)
#: Shortest side of the output picture: a 28 px fundus thumbnail becomes legible.
MIN_SIDE = 512
ALPHA = 0.4


def banner_text(model_name: str, model_version: str) -> str:
    """The burned-in top line: ``AI GENERATED — NOT FOR DIAGNOSTIC USE — <model> <version>``."""
    return f"AI GENERATED — NOT FOR DIAGNOSTIC USE — {model_name} {model_version}"


def overlay_heatmap(rgb: npt.NDArray[np.float64], heatmap: npt.NDArray[np.floating],
                    alpha: float = ALPHA) -> npt.NDArray[np.float64]:
    """Blend a [0, 1] heatmap (jet colormap) over an RGB image in [0, 255].

    The weight of the colour is ``alpha * heat`` per pixel, so where the heatmap is low the image
    stays as it was and only the regions the model relied on are tinted.
    """
    if heatmap.shape != rgb.shape[:2]:
        raise ValueError(f"heatmap shape {heatmap.shape} differs from image {rgb.shape[:2]}")
    heat = np.clip(np.nan_to_num(heatmap.astype(np.float64)), 0.0, 1.0)
    colors = matplotlib.colormaps["jet"](heat)[..., :3] * 255.0
    weight = alpha * heat[..., None]
    return rgb * (1.0 - weight) + colors * weight


def upscale_factor(shape: tuple[int, int], min_side: int = MIN_SIDE) -> float:
    """Factor that brings the shorter side to at least ``min_side`` (never shrinks)."""
    return max(1.0, min_side / min(shape))


def wrap_text(text: str, font: ImageFont.FreeTypeFont, width: float) -> list[str]:
    """Greedy word wrap so that each line fits ``width`` pixels in ``font``."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if current and font.getlength(candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current:
        lines.append(current)
    return lines or [""]


#: DejaVu Sans Bold ships with matplotlib (a dependency); Pillow's built-in font lacks the
#: em dash of the banner.
FONT_FILE = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT_FILE), size=size)


@functools.cache
def _font_characters() -> frozenset[int]:
    return frozenset(FT2Font(str(FONT_FILE)).get_charmap())


def renderable(text: str) -> bool:
    """Whether the burned-in font has a glyph for every character of ``text`` (DejaVu has no
    CJK glyphs: a Chinese caption would burn in as boxes)."""
    return all(ord(ch) in _font_characters() for ch in text if not ch.isspace())


def caption_text(explanation: Explanation, result: ModelResult, language: str) -> str:
    """The burned-in caption: the picture's own line, then the Impression of its result — in
    ``language`` when the font can draw it, else in English."""
    text = impression([result], language)
    if not renderable(text):
        text = impression([result], "en")
    return f"{explanation.caption}. {text}" if explanation.caption else text


def _text_strip(text: str, width: int, font: ImageFont.FreeTypeFont,
                color: tuple[int, int, int]) -> Image.Image:
    pad = max(4, int(font.size) // 3)
    lines = wrap_text(text, font, width - 2 * pad)
    line_height = math.ceil(float(font.size) * 1.25)
    strip = Image.new("RGB", (width, 2 * pad + line_height * len(lines)), (0, 0, 0))
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        draw.text((pad, pad + i * line_height), line, font=font, fill=color)
    return strip


def render(image: UInt8Array, heatmap: npt.NDArray[np.floating] | None, *, banner: str,
           caption: str, markers: Sequence[Box] = (), min_side: int = MIN_SIDE,
           alpha: float = ALPHA) -> UInt8Array:
    """Compose the Secondary Capture picture.

    Parameters
    ----------
    image:
        H×W grey or H×W×3 RGB uint8, as the model saw it.
    heatmap:
        H×W in [0, 1], or ``None`` for no overlay.
    banner, caption:
        Text burned into a black strip above and below the image (wrapped to the width).
    markers:
        Boxes (row0, col0, row1, col1) in ``image`` pixels, drawn as outlines.
    min_side:
        The image is enlarged so that its shorter side is at least this many pixels.
    alpha:
        Maximum opacity of the heatmap colour.

    Returns
    -------
    numpy.ndarray
        (banner + H' + caption)×W'×3 uint8 RGB; the image area is not covered by text.
    """
    if image.ndim == 2:
        rgb = np.repeat(image[..., None], 3, axis=-1).astype(np.float64)
    elif image.ndim == 3 and image.shape[-1] == 3:
        rgb = image.astype(np.float64)
    else:
        raise ValueError(f"expected H×W or H×W×3, got shape {image.shape}")
    if heatmap is not None:
        rgb = overlay_heatmap(rgb, heatmap, alpha)
    h, w = rgb.shape[:2]
    scale = upscale_factor((h, w), min_side)
    size = (round(w * scale), round(h * scale))
    picture = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), mode="RGB")
    if size != (w, h):
        picture = picture.resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(picture)
    line = max(2, round(scale))
    for r0, c0, r1, c1 in markers:
        draw.rectangle((c0 * scale, r0 * scale, c1 * scale - 1, r1 * scale - 1),
                       outline=MARKER_COLOR, width=line)
    font = _font(max(12, size[0] // 32))
    top = _text_strip(banner, size[0], font, BANNER_COLOR)
    bottom = _text_strip(caption, size[0], font, CAPTION_COLOR)
    canvas = Image.new("RGB", (size[0], top.height + size[1] + bottom.height), (0, 0, 0))
    canvas.paste(top, (0, 0))
    canvas.paste(picture, (0, top.height))
    canvas.paste(bottom, (0, top.height + size[1]))
    return np.asarray(canvas, dtype=np.uint8).copy()


_BIPED = {"L", "R", "A", "P", "H", "F"}


def orientation_letters(direction: Sequence[float]) -> str:
    """The patient-axis letter a direction cosine vector mostly points to (LPS: +x is L)."""
    axis = int(np.argmax(np.abs(direction)))
    positive = float(direction[axis]) >= 0
    return [("L", "R"), ("P", "A"), ("H", "F")][axis][0 if positive else 1]


def patient_orientation(header: Dataset) -> tuple[str, str] | None:
    """Row and column directions of the source image as single letters, or ``None``.

    Patient Orientation of the source when its values are single biped letters, else derived
    from Image Orientation (Patient) (dominant axis of each direction cosine).
    """
    values = [str(v) for v in header.get("PatientOrientation", []) or []]
    if len(values) == 2 and all(v in _BIPED for v in values):
        return values[0], values[1]
    iop = header.get("ImageOrientationPatient")
    if iop is not None and len(iop) == 6:
        cosines = [float(v) for v in iop]
        return orientation_letters(cosines[:3]), orientation_letters(cosines[3:])
    return None


def _laterality(header: Dataset) -> str | None:
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(header.get(keyword, "") or "").upper()
        if value in {"L", "R"}:
            return value
    return None


def series_description(kind: str, result: ModelResult) -> str:
    """A Series Description (LO, ≤ 64 chars) that says the series is AI output."""
    model = result.model.label
    text = f"AI {kind} {model} (not for diagnostic use)"
    return text if len(text) <= 64 else f"AI {kind} {model}"[:64]


def build_secondary_capture(explanation: Explanation, result: ModelResult,
                            settings: OutputSettings, *, index: int) -> hd.sc.SCImage:
    """One Secondary Capture for ``explanation`` (the ``index``-th of ``result``).

    Parameters
    ----------
    explanation:
        Picture, heatmap, caption and the source instance it was computed on.
    result:
        The model result it belongs to (model identity, start time, series).
    settings:
        UID root, manufacturer and institution of the output objects.
    index:
        Position among the result's explanations; part of the SOP Instance UID.

    Returns
    -------
    highdicom.sc.SCImage
        RGB, Explicit VR Little Endian, in the source's study and a new deterministic series.
    """
    model = result.model
    source = reference_header(explanation.source.header)
    caption = caption_text(explanation, result, settings.language)
    pixels = render(explanation.image, explanation.heatmap,
                    banner=banner_text(model.name, model.version),
                    caption=caption, markers=explanation.markers)
    picture = hashlib.sha256(explanation.image.tobytes())
    if explanation.heatmap is not None:
        picture.update(explanation.heatmap.tobytes())
    series_sources = [i.SOPInstanceUID for i in result.series.instances]
    orientation = patient_orientation(source)
    started = result.started
    equipment = AlgorithmEquipment(model, institution_name=settings.institution_name,
                                   contribution_datetime=started)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=derive_uid(series_sources, model, "sc-series",
                                       root=settings.uid_root),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=derive_uid([explanation.source.SOPInstanceUID], model,
                                    f"sc:{index}", root=settings.uid_root,
                                    content=content_key([result], caption,
                                                        list(explanation.markers),
                                                        picture.hexdigest(),
                                                        settings.manufacturer,
                                                        settings.institution_name)),
        instance_number=index + 1,
        manufacturer=settings.manufacturer,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        institution_name=settings.institution_name or None,
        # highdicom demands an orientation for PATIENT images; an unknown one is emptied below.
        patient_orientation=orientation or ("L", "F"),
        laterality=_laterality(source),
        series_description=series_description("HEATMAP", result),
        series_date=started.date(),
        series_time=started.time(),
        content_date=started.date(),
        content_time=started.time(),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[equipment],
        coding_schemes=coding_schemes([equipment]),
    )
    if orientation is None:
        # Patient Orientation is Type 2 for SC: empty means unknown, never a guess.
        sc.PatientOrientation = []
    sc.BurnedInAnnotation = "YES"
    if source.get("BodyPartExamined"):
        sc.BodyPartExamined = source.BodyPartExamined
        if "Laterality" in source and "Laterality" not in sc:
            # A paired body part (a hand) whose side the source leaves empty: Type 2C, so
            # present and empty as in the source ("unknown"), never a guess.
            sc.Laterality = ""
    elif "Laterality" not in sc:
        # Laterality is Type 2C when the body part is unknown (it may be a paired organ such
        # as an eye): present and empty states "unknown" rather than omitting it.
        sc.Laterality = ""
    ref = Dataset()
    ref.ReferencedSOPClassUID = explanation.source.SOPClassUID
    ref.ReferencedSOPInstanceUID = explanation.source.SOPInstanceUID
    purpose = hd.sr.CodedConcept("121322", "DCM", "Source image for image processing operation")
    ref.PurposeOfReferenceCodeSequence = [purpose]
    sc.SourceImageSequence = [ref]
    sc.DerivationDescription = (f"Heatmap of {model.label} over the analysed "
                                "image; banner and caption burned in")
    return sc
