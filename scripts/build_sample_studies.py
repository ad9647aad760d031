"""Build ``sample_studies/`` from the real data in ``../shared/data``.

Chest X-rays (Kermany et al. 2018, CC BY 4.0) become CR and DX objects, RetinaMNIST fundus
photographs (CC BY 4.0) become Ophthalmic Photography 8 Bit objects, ISIC 2017 dermoscopic
images (CC-0) become Dermoscopic Photography objects, and the TCIA
Lung-PET-CT-Dx A0002 chest CT series (CC BY 4.0) is copied unchanged. The output is
deterministic: UIDs are derived from fixed strings and dates are fixed, so re-running the
script reproduces byte-identical files.

Usage::

    python scripts/build_sample_studies.py [--data ../shared/data] [--out sample_studies] [--check]

``--check`` runs dicom3tools ``dciodvfy`` on every written object and fails on any "Error" line.
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gdcm
import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "sample_studies"

CR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_PRESENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")
DX_PROCESSING_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1.1")
OP_8BIT_STORAGE = UID("1.2.840.10008.5.1.4.1.1.77.1.5.1")
DERMOSCOPIC_STORAGE = UID("1.2.840.10008.5.1.4.1.1.77.1.7")

#: Every sample study carries the same made-up date, so nothing depends on when it was built.
STUDY_DATE = "20250101"
#: Salt of every derived UID: changing it changes every UID, nothing else does.
UID_SALT = "dicom-ai sample_studies v1"
#: Encoder plugins named explicitly so that a newly installed plugin cannot change the bytes.
ENCODING_PLUGIN = {
    RLELossless: "pydicom", JPEGLSLossless: "pyjpegls", JPEG2000Lossless: "pylibjpeg",
}
JPEG_QUALITY = 95
#: The Kermany files carry no pixel spacing but DX requires Imager Pixel Spacing: a nominal
#: detector pitch (typical of CR plates) at the original resolution, scaled by the published
#: resize. It is not a calibration; nothing should measure lengths on these images.
NOMINAL_PITCH_MM = 0.15

CT_ARCHIVE = "ct/lung_pet_ct_dx_A0002.tar.xz"
CT_SERIES_DIR = "lung_pet_ct_dx/A0002/series_B40f"
CT_OUT_DIR = "ct-lung-pet-ct-dx-a0002"


@dataclass(frozen=True)
class ChestXRay:
    """One chest X-ray study: which source image and how it is encoded."""

    key: str
    source: str
    label: str
    modality: str
    #: "FOR PRESENTATION" or "FOR PROCESSING" for DX; empty for CR.
    presentation_intent: str
    photometric: str
    bits_stored: int
    window: bool
    transfer_syntax: UID
    #: The Kermany folder under the data folder that holds ``source`` and its ``labels.csv``;
    #: only ``kermany_fullres_subset`` records the original size a DX's pixel spacing needs.
    root: str = "cxr/kermany_fullres_subset"


@dataclass(frozen=True)
class Fundus:
    """One fundus study: a RetinaMNIST validation image and how it is encoded."""

    key: str
    val_index: int
    grade: int
    #: Read by eye from the side of the optic disc (RetinaMNIST has no laterality): the disc
    #: appears on the viewer's right in a right eye.
    laterality: str
    #: JPEG baseline is written as YBR_FULL_422, anything else as RGB.
    transfer_syntax: UID


CHEST_XRAYS: tuple[ChestXRay, ...] = (
    ChestXRay("CXR01", "train/NORMAL/IM-0199-0001.jpeg", "NORMAL", "CR", "",
              "MONOCHROME2", 8, False, ExplicitVRLittleEndian),
    ChestXRay("CXR02", "train/PNEUMONIA/person480_virus_982.jpeg", "PNEUMONIA", "CR", "",
              "MONOCHROME1", 12, True, RLELossless),
    ChestXRay("CXR03", "train/NORMAL/IM-0448-0001.jpeg", "NORMAL", "DX", "FOR PRESENTATION",
              "MONOCHROME2", 12, True, JPEG2000Lossless),
    ChestXRay("CXR04", "train/PNEUMONIA/person898_bacteria_2823.jpeg", "PNEUMONIA", "DX",
              "FOR PROCESSING", "MONOCHROME1", 12, False, JPEGLSLossless),
)

FUNDUS_PHOTOS: tuple[Fundus, ...] = (
    Fundus("FUNDUS01", 8, 0, "R", ExplicitVRLittleEndian),
    Fundus("FUNDUS02", 67, 2, "L", JPEGBaseline8Bit),
    Fundus("FUNDUS03", 49, 4, "L", RLELossless),
)


def derived_uid(*parts: str) -> UID:
    """A fixed UID under pydicom's root, hashed from ``parts`` (same parts → same UID).

    (``generate_uid(prefix=None)`` would ignore the entropy sources and return a random UUID.)
    """
    return generate_uid(entropy_srcs=[UID_SALT, *parts])


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """One item of a code sequence."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def to_stored_range(gray: npt.NDArray[np.uint8], bits_stored: int,
                    photometric: str) -> npt.NDArray[np.uint8] | npt.NDArray[np.uint16]:
    """8-bit display values → stored values that display identically.

    The 0–255 range is stretched to ``0 … 2**bits_stored - 1`` (``round(v * max / 255)``), and
    for MONOCHROME1 the values are inverted (``max - v``) because MONOCHROME1 shows the
    maximum as black.
    """
    top = 2**bits_stored - 1
    if bits_stored == 8:
        values = gray.astype(np.int64)
    else:
        values = np.rint(gray.astype(np.float64) * (top / 255.0)).astype(np.int64)
    if photometric == "MONOCHROME1":
        values = top - values
    if bits_stored <= 8:
        return values.astype(np.uint8)
    return values.astype(np.uint16)


def file_meta(sop_class: UID, sop_instance: UID, transfer_syntax: UID) -> FileMetaDataset:
    """File meta information for a new object."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    return meta


def base_dataset(key: str, *, sop_class: UID, modality: str, patient_label: str,
                 study_description: str, series_description: str, study_time: str,
                 provenance: str) -> Dataset:
    """Patient, study, series, equipment and SOP common attributes shared by every object.

    The patient identity is synthetic and says so: ``ANON^<key>`` / ``DICOMAI-<label>``.
    """
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = derived_uid(key, "instance")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = study_time
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.PatientName = f"ANON^{key}"
    ds.PatientID = f"DICOMAI-{patient_label}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Synthetic identity; pixels from a public de-identified dataset"
    ds.StudyInstanceUID = derived_uid(key, "study")
    ds.SeriesInstanceUID = derived_uid(key, "series")
    ds.StudyID = key
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageComments = provenance
    return ds


def set_pixels(ds: Dataset, pixels: npt.NDArray[np.uint8] | npt.NDArray[np.uint16], *,
               photometric: str, bits_stored: int) -> None:
    """Image Pixel module for an uncompressed array (H×W grayscale or H×W×3 colour)."""
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()


def encode(ds: Dataset, transfer_syntax: UID) -> None:
    """Compress the pixel data in place (lossless encoders, fixed plugin, same SOP UID)."""
    if transfer_syntax == ExplicitVRLittleEndian:
        return
    if transfer_syntax == JPEGLosslessSV1:
        encode_jpeg_lossless(ds)
        return
    ds.compress(transfer_syntax, encoding_plugin=ENCODING_PLUGIN[transfer_syntax],
                generate_instance_uid=False)


def encode_jpeg_lossless(ds: Dataset) -> None:
    """JPEG Lossless, first-order prediction (Process 14, SV1) by GDCM, the syntax CR and DX
    modalities commonly send.

    pydicom has no encoder for it, so GDCM transcodes a copy written to a temporary file and
    only its encapsulated pixel data is kept: GDCM's writer also adds attributes of its own
    (Rescale, Imager Pixel Spacing) that these objects must not carry. The decoded result is
    checked against the original array.
    """
    with tempfile.TemporaryDirectory() as tmp:
        plain, coded = Path(tmp) / "plain.dcm", Path(tmp) / "coded.dcm"
        ds.save_as(plain, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(plain))
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(coded))
        if not reader.Read():
            raise RuntimeError(f"GDCM cannot read {ds.SOPInstanceUID} back")
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise RuntimeError(f"GDCM cannot encode {ds.SOPInstanceUID} as JPEG Lossless")
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise RuntimeError(f"GDCM cannot write {ds.SOPInstanceUID}")
        coded_ds = dcmread(coded)
    if not np.array_equal(coded_ds.pixel_array, ds.pixel_array):
        raise RuntimeError(f"{ds.SOPInstanceUID}: GDCM's JPEG Lossless does not decode to the "
                           "original pixels")
    ds.PixelData = coded_ds.PixelData
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1


def lossy_source(ds: Dataset, ratio: float) -> None:
    """Record that the pixels went through JPEG (ISO 10918-1) before they reached us."""
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = f"{ratio:.2f}"
    ds.LossyImageCompressionMethod = "ISO_10918_1"


def chest_xray(spec: ChestXRay, data: Path) -> Dataset:
    """Build one CR or DX object from a Kermany JPEG (see :data:`CHEST_XRAYS`)."""
    path = data / spec.root / spec.source
    row = source_row(data, spec)
    gray = np.asarray(Image.open(path).convert("L"), dtype=np.uint8)
    if spec.modality == "CR":
        sop_class = CR_STORAGE
    elif spec.presentation_intent == "FOR PRESENTATION":
        sop_class = DX_PRESENTATION_STORAGE
    else:
        sop_class = DX_PROCESSING_STORAGE
    number = spec.key[-2:]
    ds = base_dataset(
        spec.key, sop_class=sop_class, modality=spec.modality, patient_label=f"CXR-{number}",
        study_description="XR CHEST 1 VIEW (dicom-ai sample)",
        series_description=f"Chest AP {spec.modality}", study_time=f"09{number}00",
        provenance=(f"Kermany et al. 2018 (CC BY 4.0) {spec.source}; converted by "
                    "scripts/build_sample_studies.py; sample study, not for diagnostic use"))
    ds.BodyPartExamined = "CHEST"
    # The Kermany paper describes its radiographs as anterior-posterior.
    ds.ViewPosition = "AP"
    # Checked by eye on all four: the R marker / heart show the standard display orientation.
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.DerivationDescription = "JPEG from a public dataset re-encoded as DICOM"
    # Side markers ("R") are burned into most of these radiographs; no identity is.
    ds.BurnedInAnnotation = "YES"
    lossy_source(ds, gray.size / path.stat().st_size)
    set_pixels(ds, to_stored_range(gray, spec.bits_stored, spec.photometric),
               photometric=spec.photometric, bits_stored=spec.bits_stored)
    if spec.window:
        full_range_window(ds, spec.bits_stored)
    if spec.modality == "DX":
        add_dx_modules(ds, spec, nominal_spacing_mm(row))
    ds.file_meta = file_meta(sop_class, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    encode(ds, spec.transfer_syntax)
    return ds


def full_range_window(ds: Dataset, bits_stored: int) -> None:
    """A VOI window whose centre/width map the stored range exactly onto the display range: the
    model sees what it saw in training (the source JPEG).

    VOI LUT Function is left out: LINEAR is its default (PS3.3 C.11.2.1.3), and OHIF 3.13's
    image loader throws "Invalid VOI LUT function" on an explicit LINEAR sent over DICOMweb, so
    the film would not display at all.
    """
    top = 2**bits_stored
    ds.WindowCenter = top // 2
    ds.WindowWidth = top


def source_row(data: Path, spec: ChestXRay) -> dict[str, str]:
    """The ``labels.csv`` row of the source image, after checking its label is the expected one."""
    with open(data / spec.root / "labels.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["path"] == spec.source)
    if row["label"] != spec.label:
        raise ValueError(f"{spec.key}: {spec.source} is {row['label']}, expected {spec.label}")
    return row


def nominal_spacing_mm(row: dict[str, str]) -> float:
    """:data:`NOMINAL_PITCH_MM` scaled by original width / stored width of a ``labels.csv`` row."""
    original = int(row["original_size"].split("x")[0])
    stored = int(row["stored_size"].split("x")[0])
    return round(NOMINAL_PITCH_MM * original / stored, 4)


def add_dx_modules(ds: Dataset, spec: ChestXRay, spacing_mm: float) -> None:
    """DX Series, DX Anatomy Imaged, DX Image, DX Detector and DX Positioning attributes."""
    ds.PresentationIntentType = spec.presentation_intent
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = DicomSequence([code_item("816094009", "SCT", "Chest")])
    ds.ViewCodeSequence = DicomSequence([code_item("399348003", "SCT", "antero-posterior")])
    ds.PixelIntensityRelationship = "LOG"
    # Bone (little X-ray intensity reaches the detector) is white: a high stored value in
    # MONOCHROME2 (sign -1, "higher values = less intensity"), a low one in MONOCHROME1 (+1).
    ds.PixelIntensityRelationshipSign = 1 if spec.photometric == "MONOCHROME1" else -1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "INVERSE" if spec.photometric == "MONOCHROME1" else "IDENTITY"
    ds.DetectorType = ""
    ds.PositionerType = ""
    ds.ImagerPixelSpacing = [spacing_mm, spacing_mm]
    ds.AcquisitionContextSequence = DicomSequence()


@dataclass(frozen=True)
class FractureXRay:
    """One musculoskeletal radiograph from the FracAtlas train split (CC BY 4.0), written as
    a CR image: the files carry no side marker or laterality, and a CR may leave Patient
    Orientation empty (Type 2C) where a DX must fill it."""

    key: str
    source: str
    #: DICOM Body Part Examined.
    body_part: str
    photometric: str
    bits_stored: int
    window: bool
    transfer_syntax: UID
    #: What ``labels.csv`` must say of the source: the sample studies come from the train split
    #: only (the valid split scores the model).
    label: str = "fracture"
    split: str = "train"


FRACTURE_XRAYS: tuple[FractureXRay, ...] = (
    # A hand and wrist in a cast, frontal view, one distal-radius fracture box.
    FractureXRay("FRACTURE01", "train/IMG0003233.jpg", "HAND", "MONOCHROME2", 12, True,
                 JPEGLosslessSV1),
)


def fracatlas_boxes_px(data: Path, source: str, rows: int, cols: int
                       ) -> list[tuple[float, float, float, float]]:
    """The radiologists' boxes of one FracAtlas image (normalized cx, cy, w, h in
    ``boxes.csv``) as (col_min, row_min, col_max, row_max) in stored pixels."""
    out = []
    with open(data / "fracture" / "fracatlas" / "boxes.csv", newline="") as fh:
        for b in csv.DictReader(fh):
            if b["path"] == source:
                cx, cy, w, h = (float(b[k]) for k in ("cx", "cy", "w", "h"))
                out.append(((cx - w / 2) * cols, (cy - h / 2) * rows,
                            (cx + w / 2) * cols, (cy + h / 2) * rows))
    return out


def fracture_xray(spec: FractureXRay, data: Path) -> Dataset:
    """Build one CR object from a FracAtlas JPEG; Image Comments name the source, its licence
    and its fracture boxes in stored pixels."""
    root = data / "fracture" / "fracatlas"
    with open(root / "labels.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["path"] == spec.source)
    if (row["label"], row["split"]) != (spec.label, spec.split):
        raise ValueError(f"{spec.key}: {spec.source} is {row['label']}/{row['split']}, "
                         f"expected {spec.label}/{spec.split}")
    path = root / spec.source
    gray = np.asarray(Image.open(path).convert("L"), dtype=np.uint8)
    boxes = [f"[{c0:.1f}, {r0:.1f}, {c1:.1f}, {r1:.1f}]"
             for c0, r0, c1, r1 in fracatlas_boxes_px(data, spec.source, *gray.shape)]
    number = spec.key[-2:]
    ds = base_dataset(
        spec.key, sop_class=CR_STORAGE, modality="CR", patient_label=f"FRACTURE-{number}",
        study_description=f"XR {spec.body_part} (dicom-ai sample)",
        series_description=f"{spec.body_part.title()} CR", study_time=f"11{number}00",
        provenance=(f"FracAtlas, Abedeen et al., Scientific Data 10, 521 (2023), CC BY 4.0, "
                    f"{spec.source}; radiologists' fracture box(es) [col_min, row_min, "
                    f"col_max, row_max] in stored pixels: {'; '.join(boxes)}; converted by "
                    "scripts/build_sample_studies.py; sample study, not for diagnostic use"))
    ds.BodyPartExamined = spec.body_part
    # Unknown: FracAtlas records neither the side nor the projection's direction (Type 2:
    # present and empty).
    ds.Laterality = ""
    ds.ViewPosition = ""
    ds.PatientOrientation = ""
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.DerivationDescription = "JPEG from a public dataset re-encoded as DICOM"
    ds.BurnedInAnnotation = "YES"
    lossy_source(ds, gray.size / path.stat().st_size)
    set_pixels(ds, to_stored_range(gray, spec.bits_stored, spec.photometric),
               photometric=spec.photometric, bits_stored=spec.bits_stored)
    if spec.window:
        full_range_window(ds, spec.bits_stored)
    ds.file_meta = file_meta(CR_STORAGE, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    encode(ds, spec.transfer_syntax)
    return ds


def fundus_photo(spec: Fundus, images: npt.NDArray[np.uint8],
                 labels: npt.NDArray[np.uint8]) -> Dataset:
    """Build one Ophthalmic Photography 8 Bit object from a RetinaMNIST validation image."""
    if int(labels[spec.val_index]) != spec.grade:
        raise ValueError(f"{spec.key}: val image {spec.val_index} is grade "
                         f"{int(labels[spec.val_index])}, expected {spec.grade}")
    rgb = np.ascontiguousarray(images[spec.val_index])
    number = spec.key[-2:]
    ds = base_dataset(
        spec.key, sop_class=OP_8BIT_STORAGE, modality="OP", patient_label=f"FUNDUS-{number}",
        study_description="Fundus photography (dicom-ai sample)",
        series_description=f"Fundus {spec.laterality}", study_time=f"10{number}00",
        provenance=(f"RetinaMNIST / DeepDRiD (CC BY 4.0) val image {spec.val_index}, DR grade "
                    f"{spec.grade}; converted by scripts/build_sample_studies.py; sample "
                    "study, not for diagnostic use"))
    ds.ImageType = ["DERIVED", "PRIMARY", "RESAMPLED"]
    ds.AcquisitionDateTime = f"{STUDY_DATE}10{number}00"
    ds.BurnedInAnnotation = "NO"
    # The OP IOD includes the Multi-frame module; a still photograph is one frame and its
    # frame increment pointer needs a target, so Frame Time is present and 0.
    ds.NumberOfFrames = 1
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 0
    ds.ImageLaterality = spec.laterality
    ds.PatientOrientation = ""
    ds.SourceImageSequence = DicomSequence()
    # The OP IOD makes the Synchronization module mandatory; nothing is synchronized here.
    ds.SynchronizationFrameOfReferenceUID = derived_uid(spec.key, "synchronization")
    ds.SynchronizationTrigger = "NO TRIGGER"
    ds.AcquisitionTimeSynchronized = "N"
    ds.AnatomicRegionSequence = DicomSequence([code_item("5665001", "SCT", "Retina")])
    ds.AcquisitionContextSequence = DicomSequence()
    ds.PatientEyeMovementCommanded = ""
    ds.RefractiveStateSequence = DicomSequence()
    ds.EmmetropicMagnification = None
    ds.IntraOcularPressure = None
    ds.HorizontalFieldOfView = None
    ds.PupilDilated = ""
    ds.AcquisitionDeviceTypeCodeSequence = DicomSequence(
        [code_item("409898007", "SCT", "Fundus Camera")])
    ds.IlluminationTypeCodeSequence = DicomSequence()
    ds.LightPathFilterTypeStackCodeSequence = DicomSequence()
    ds.ImagePathFilterTypeStackCodeSequence = DicomSequence()
    ds.LensesCodeSequence = DicomSequence()
    ds.DetectorType = ""
    if spec.transfer_syntax == JPEGBaseline8Bit:
        encode_jpeg_422(ds, rgb)
        return ds
    # Lossy compression is recorded for the file we convert: the npz holds raw 8-bit values.
    # (The DeepDRiD JPEGs behind them were downsampled ~60-fold; see the README.)
    ds.LossyImageCompression = "00"
    set_pixels(ds, rgb, photometric="RGB", bits_stored=8)
    ds.file_meta = file_meta(OP_8BIT_STORAGE, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    encode(ds, spec.transfer_syntax)
    return ds


def encode_jpeg_422(ds: Dataset, rgb: npt.NDArray[np.uint8],
                    sop_class: UID = OP_8BIT_STORAGE) -> None:
    """Pixel data as JPEG baseline with 4:2:2 chroma (Pillow), photometric YBR_FULL_422.

    pydicom has no JPEG baseline encoder, so Pillow writes the JPEG and it is encapsulated.
    """
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=JPEG_QUALITY,
                              subsampling="4:2:2", optimize=False)
    jpeg = buffer.getvalue()
    ds.Rows, ds.Columns = int(rgb.shape[0]), int(rgb.shape[1])
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = f"{rgb.nbytes / len(jpeg):.2f}"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    ds.file_meta = file_meta(sop_class, ds.SOPInstanceUID, JPEGBaseline8Bit)


@dataclass(frozen=True)
class Dermoscopy:
    """One dermoscopic image from the ISIC 2017 train split (CC-0), written as Dermoscopic
    Photography; JPEG baseline is written as YBR_FULL_422, anything else as RGB."""

    key: str
    source: str
    label: str
    transfer_syntax: UID
    split: str = "train"


#: The first train image of each class by file name.
DERMOSCOPY_IMAGES: tuple[Dermoscopy, ...] = (
    Dermoscopy("DERM01", "train/ISIC_0000002.jpg", "melanoma", ExplicitVRLittleEndian),
    Dermoscopy("DERM02", "train/ISIC_0000000.jpg", "nevus", JPEGBaseline8Bit),
    Dermoscopy("DERM03", "train/ISIC_0012090.jpg", "seborrheic_keratosis", RLELossless),
)


def dermoscopy_image(spec: Dermoscopy, data: Path) -> Dataset:
    """Build one Dermoscopic Photography object from an ISIC 2017 JPEG.

    What ISIC 2017 does not record (light source polarization, contact method, optical
    magnification, emitter colour temperature, the site on the body, the side) is present and
    empty where the IOD makes it Type 2; the anatomic region is the generic "Skin".
    """
    root = data / "skin" / "isic2017"
    with open(root / "labels.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["path"] == spec.source)
    if (row["label"], row["split"]) != (spec.label, spec.split):
        raise ValueError(f"{spec.key}: {spec.source} is {row['label']}/{row['split']}, "
                         f"expected {spec.label}/{spec.split}")
    path = root / spec.source
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)
    number = spec.key[-2:]
    ds = base_dataset(
        spec.key, sop_class=DERMOSCOPIC_STORAGE, modality="DMS",
        patient_label=f"DERM-{number}", study_description="Dermoscopy (dicom-ai sample)",
        series_description="Dermoscopy", study_time=f"12{number}00",
        provenance=(f"ISIC 2017 (Codella et al. 2018, CC-0) {spec.source}, {spec.label}; "
                    "256x256 copy, aspect ratio not kept; converted by "
                    "scripts/build_sample_studies.py; sample study, not for diagnostic use"))
    # Enhanced General Equipment (Type 1): the converter is what produced the object.
    ds.Manufacturer = "dicom-ai"
    ds.ManufacturerModelName = "scripts/build_sample_studies.py"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = UID_SALT
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.DerivationDescription = "JPEG from a public dataset re-encoded as DICOM"
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.Laterality = ""
    ds.PatientOrientation = ""
    ds.FrameOfReferenceUID = derived_uid(spec.key, "frame of reference")
    ds.PositionReferenceIndicator = ""
    ds.AnatomicRegionSequence = DicomSequence([code_item("39937001", "SCT", "Skin")])
    ds.AcquisitionContextSequence = DicomSequence()
    ds.LightSourcePolarization = None
    ds.EmitterColorTemperature = None
    ds.ContactMethod = None
    ds.OpticalMagnificationFactor = None
    source_ratio = rgb.nbytes / path.stat().st_size
    if spec.transfer_syntax == JPEGBaseline8Bit:
        encode_jpeg_422(ds, rgb, DERMOSCOPIC_STORAGE)
        # Compressed twice: the ISIC JPEG, then our JPEG baseline.
        ds.LossyImageCompressionRatio = [f"{source_ratio:.2f}",
                                         str(ds.LossyImageCompressionRatio)]
        ds.LossyImageCompressionMethod = ["ISO_10918_1", "ISO_10918_1"]
        return ds
    lossy_source(ds, source_ratio)
    set_pixels(ds, np.ascontiguousarray(rgb), photometric="RGB", bits_stored=8)
    ds.file_meta = file_meta(DERMOSCOPIC_STORAGE, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    encode(ds, spec.transfer_syntax)
    return ds


def copy_ct_series(data: Path, out: Path) -> list[Path]:
    """Unpack the Lung-PET-CT-Dx A0002 archive and copy its 30 slices unchanged."""
    target = out / CT_OUT_DIR
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(data / CT_ARCHIVE) as tar:
        tar.extractall(tmp, filter="data")
        slices = sorted((Path(tmp) / CT_SERIES_DIR).glob("*.dcm"))
        if len(slices) != 30:
            raise RuntimeError(f"expected 30 CT slices in {CT_ARCHIVE}, found {len(slices)}")
        return [Path(shutil.copyfile(s, target / s.name)) for s in slices]


def write(ds: Dataset, path: Path) -> Path:
    """Save with a preamble and file meta (DICOM Part 10)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


#: dciodvfy also checks the optional General Reference module, which wants 1-n Source Image
#: items, against the OP Image module's own Source Image Sequence (Type 2C, "zero or more
#: items", PS3.3 C.8.17.2). A derived OP image with no DICOM source is conformant; these two
#: lines are that clash, not a defect of the object.
DCIODVFY_MODULE_CLASH = (
    "Error - Bad Sequence number of Items 0 (1-n Required by Module definition) "
    "Element=<SourceImageSequence> Module=<GeneralReference>",
    "Error - Bad attribute Value Multiplicity Type 3 Optional "
    "Element=<SourceImageSequence> Module=<GeneralReference>",
)


def dciodvfy_errors(path: Path) -> list[str]:
    """The "Error" lines dicom3tools reports for one object, less :data:`DCIODVFY_MODULE_CLASH`."""
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error") and line not in DCIODVFY_MODULE_CLASH]


def build(data: Path, out: Path) -> list[Path]:
    """Write every sample study under ``out``; return the written files in order."""
    written = [write(chest_xray(spec, data), out / spec.key.lower() / "1.dcm")
               for spec in CHEST_XRAYS]
    with np.load(data / "fundus" / "retinamnist28_trainval.npz") as npz:
        images = npz["val_images"]
        labels = npz["val_labels"].ravel()
    written += [write(fundus_photo(spec, images, labels), out / spec.key.lower() / "1.dcm")
                for spec in FUNDUS_PHOTOS]
    written += [write(fracture_xray(spec, data), out / spec.key.lower() / "1.dcm")
                for spec in FRACTURE_XRAYS]
    written += [write(dermoscopy_image(spec, data), out / spec.key.lower() / "1.dcm")
                for spec in DERMOSCOPY_IMAGES]
    written += copy_ct_series(data, out)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry: build, optionally validate with dciodvfy; 0 on success."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="the shared data folder (default: ../shared/data)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="where to write (default: sample_studies/)")
    parser.add_argument("--check", action="store_true",
                        help="validate each built object with dicom3tools dciodvfy")
    args = parser.parse_args(argv)
    written = build(args.data, args.out)
    failed = False
    for path in written:
        if args.check and CT_OUT_DIR not in path.parts:
            errors = dciodvfy_errors(path)
            failed = failed or bool(errors)
            for line in errors:
                print(f"{path}: {line}", file=sys.stderr)
        print(path.relative_to(args.out))
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{len(written)} files, {total / 2**20:.1f} MiB under {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
