"""The real public test corpus (../shared/data/dicom, 308 files): every file is accounted for,
no exception escapes, and every image either decodes or fails with PixelDecodeError."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from dicom_ai.dicom.collect import collect
from dicom_ai.dicom.errors import PixelDecodeError, SeriesGeometryError, UnreadableFileError
from dicom_ai.dicom.io import read_header
from dicom_ai.dicom.model import Instance, Series
from dicom_ai.dicom.pixels import decode_pixels
from dicom_ai.imaging.ct import build_volume

CORPUS = Path(__file__).parents[2].parent / "shared" / "data" / "dicom"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CORPUS / "INDEX.tsv").is_file(), reason="corpus not present"),
]

#: Files pydicom 3.0.2 with our BSD/MIT decoders cannot decode, and why (reason prefixes).
EXPECTED_DECODE_FAILURES = {
    "pydicom-data/liver_deflate.dcm": "Deflated Image Frame Compression is not supported",
    "pydicom-data/liver_nonbyte_aligned_deflate.dcm":
        "Deflated Image Frame Compression is not supported",
    "pydicom-data/liver_rle.dcm": "cannot decode RLE Lossless: ",
    "pydicom-data/liver_nonbyte_aligned_rle.dcm": "cannot decode RLE Lossless: ",
    # A sequence delimiter overwrites the SIZ segment: the codestream claims 3722445056 columns.
    "pydicom_test_files/JPEG2000-embedded-sequence-delimiter.dcm":
        "a codestream declares 3722445056 x 1024 x 1 samples, the header 256 x 1024 x 1",
    "pydicom_test_files/JPGExtended.dcm": "cannot decode JPEG Extended (Process 2 and 4): ",
    "pylibjpeg-data/JPEGExtended/RG2_JPLY_fixed.dcm":
        "cannot decode JPEG Extended (Process 2 and 4): ",
    "pydicom_test_files/meta_missing_tsyntax.dcm": "missing Rows (0028,0010)",
    "pydicom_test_files/nested_priv_SQ.dcm": "missing Rows (0028,0010)",
}


def _files() -> list[Path]:
    return sorted(p for p in CORPUS.rglob("*") if p.is_file())


def test_collect_accounts_for_every_file() -> None:
    indexed = {line.split("\t")[0] for line in
               (CORPUS / "INDEX.tsv").read_text().splitlines()[1:]}
    assert len(indexed) == 308
    result = collect(CORPUS)
    entries = {str(e.path.relative_to(CORPUS)): e for e in result.entries}
    assert set(entries) == {str(p.relative_to(CORPUS)) for p in _files()}
    assert indexed <= set(entries)
    for name, entry in entries.items():
        assert entry.status in {"ok", "skipped", "failed"}, name
        assert (entry.reason is None) == (entry.status == "ok"), name
        assert entry.reason is None or "\n" not in entry.reason
    grouped = sum(len(s.instances) for st in result.studies for s in st.series)
    assert grouped == sum(e.status == "ok" for e in result.entries)
    reasons = Counter(e.reason for e in result.entries if e.status != "ok")
    assert reasons["DICOMDIR: a media directory, not an image"] == 8
    assert entries["pydicom_test_files/badVR.dcm"].reason == \
        "invalid value for VR IS in (0028,0008)"
    assert entries["pydicom_test_files/rtplan_truncated.dcm"].reason == \
        "truncated: (300A,00B0) holds 711 of 976 bytes"
    # Cut inside their pixel data, which a header read does not load.
    assert entries["pydicom_test_files/MR_truncated.dcm"].reason == \
        "truncated: (7FE0,0010) holds 8130 of 8192 bytes"
    assert entries["pydicom-data/emri_small_jpeg_2k_lossless_too_short.dcm"].reason == \
        "truncated: (7FE0,0010) ends before its sequence delimiter"
    assert entries["pydicom_test_files/zipMR.gz"].reason == "not a DICOM file"
    assert entries["INDEX.tsv"].reason == "not a DICOM file"
    # Read only by force (no preamble, no file meta), and complete.
    assert entries["pydicom_test_files/rtstruct.dcm"].status == "ok"
    assert entries["pydicom_test_files/ExplVR_BigEndNoMeta.dcm"].status == "ok"


def test_every_readable_image_decodes_or_says_why() -> None:
    outcomes: Counter[str] = Counter()
    failures: dict[str, str] = {}
    for path in _files():
        try:
            header = read_header(path)
        except UnreadableFileError:
            outcomes["unreadable"] += 1
            continue
        try:
            decoded = decode_pixels(Instance(path, header))
        except PixelDecodeError as exc:
            if exc.reason == "no pixel data":
                outcomes["no pixel data"] += 1
            else:
                outcomes["failed"] += 1
                failures[str(path.relative_to(CORPUS))] = exc.reason
            continue
        outcomes["decoded"] += 1
        frames = int(header.get("NumberOfFrames", 1) or 1)
        rows_cols = decoded.array.shape[1:3] if frames > 1 else decoded.array.shape[:2]
        assert rows_cols == (header.Rows, header.Columns), path
    assert set(failures) == set(EXPECTED_DECODE_FAILURES)
    for name, reason in failures.items():
        assert reason.startswith(EXPECTED_DECODE_FAILURES[name]), (name, reason)
        assert "\n" not in reason
    assert outcomes == {"decoded": 221, "no pixel data": 72, "failed": 9, "unreadable": 7}


def test_tilted_head_ct_is_rejected_with_its_angle() -> None:
    (study,) = collect(CORPUS / "dcm_qa_ct").studies
    (series,) = study.series
    assert len(series.instances) == 28
    assert float(series.header.GantryDetectorTilt) == 18.5
    with pytest.raises(SeriesGeometryError) as info:
        build_volume(series)
    assert info.value.reason == ("gantry tilt: slices are stacked 18.50° off the slice normal "
                                 "(limit 0.5°)")
    # Past the tilt it is a GE head protocol: 4 mm slices, then 7 mm ones.
    with pytest.raises(SeriesGeometryError) as info:
        build_volume(series, max_tilt_deg=20.0)
    assert info.value.reason == ("inconsistent spacing: slice steps range from 1.08 to 7.00 mm "
                                 "(median 4.00 mm)")
    volume = build_volume(Series(series.series_instance_uid, series.instances[:4]),
                          max_tilt_deg=20.0)
    assert volume.hu.shape == (4, 512, 512)
    assert volume.spacing[1:] == pytest.approx((0.4882812, 0.4882812))
