"""Discovery and grouping: every input file is accounted for, by content, deterministically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage

from dicom_ai.dicom import collect as collect_module
from dicom_ai.dicom.collect import FileEntry, collect, discover, looks_like_dicom
from dicom_ai.dicom.io import MEDIA_STORAGE_DIRECTORY
from tests.conftest import SERIES_UID, STUDY_UID, MakeDicom

PIXELS = np.zeros((2, 2), dtype=np.uint8)
OTHER_STUDY = "1.2.826.0.1.3680043.8.498.9"
OTHER_SERIES = "1.2.826.0.1.3680043.8.498.9.1"


def test_discover_by_content_recursive_sorted(make_dicom: MakeDicom, tmp_path: Path) -> None:
    make_dicom("b/IM0002", PIXELS)
    make_dicom("a/img.dcm", PIXELS)
    make_dicom("a/.hidden.dcm", PIXELS)
    make_dicom(".cache/x.dcm", PIXELS)
    (tmp_path / "a" / "readme.dcm").write_text("not an image, whatever the extension says\n")
    assert discover(tmp_path) == [tmp_path / "a" / "img.dcm", tmp_path / "b" / "IM0002"]


def test_looks_like_dicom_without_preamble(tmp_path: Path) -> None:
    little = tmp_path / "le"
    little.write_bytes(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100")
    big = tmp_path / "be"
    big.write_bytes(b"\x00\x08\x00\x05CS\x00\x0aISO_IR 100")
    short = tmp_path / "short"
    short.write_bytes(b"\x08\x00")
    assert looks_like_dicom(little)
    assert looks_like_dicom(big)
    assert not looks_like_dicom(short)
    assert not looks_like_dicom(tmp_path / "absent")


def test_groups_studies_and_series_in_first_seen_order(make_dicom: MakeDicom,
                                                       tmp_path: Path) -> None:
    make_dicom("1.dcm", PIXELS)
    make_dicom("2.dcm", PIXELS, StudyInstanceUID=OTHER_STUDY, SeriesInstanceUID=OTHER_SERIES)
    make_dicom("3.dcm", PIXELS, SeriesInstanceUID=SERIES_UID + ".2")
    make_dicom("4.dcm", PIXELS)
    result = collect(tmp_path)
    assert [s.study_instance_uid for s in result.studies] == [STUDY_UID, OTHER_STUDY]
    first = result.studies[0]
    assert [s.series_instance_uid for s in first.series] == [SERIES_UID, SERIES_UID + ".2"]
    assert [i.path.name for i in first.series[0].instances] == ["1.dcm", "4.dcm"]
    assert [e.status for e in result.entries] == ["ok"] * 4


def test_every_file_gets_an_entry(make_dicom: MakeDicom, tmp_path: Path) -> None:
    make_dicom("01-image.dcm", PIXELS, SOPInstanceUID="1.2.3.4")
    make_dicom("02-same-uid.dcm", PIXELS, SOPInstanceUID="1.2.3.4")
    make_dicom("03-report.dcm", None, SOPClassUID=ComprehensiveSRStorage, Modality="SR")
    make_dicom("04-dicomdir", None, SOPClassUID=MEDIA_STORAGE_DIRECTORY)
    make_dicom("05-no-series.dcm", PIXELS, SeriesInstanceUID="")
    (tmp_path / "06-notes.txt").write_text("hello")
    good = make_dicom("07-cut.dcm", None, ImageComments="y" * 300).read_bytes()
    (tmp_path / "07-cut.dcm").write_bytes(good[:-100])
    entries = {e.path.name: e for e in collect(tmp_path).entries}
    assert [(n, e.status, e.reason) for n, e in sorted(entries.items())] == [
        ("01-image.dcm", "ok", None),
        ("02-same-uid.dcm", "skipped", "duplicate SOP Instance UID"),
        ("03-report.dcm", "ok", None),
        ("04-dicomdir", "skipped", "DICOMDIR: a media directory, not an image"),
        ("05-no-series.dcm", "failed", "missing SeriesInstanceUID (0020,000E)"),
        ("06-notes.txt", "skipped", "not a DICOM file"),
        ("07-cut.dcm", "failed", "truncated: (0020,4000) holds 200 of 300 bytes"),
    ]
    assert entries["02-same-uid.dcm"].sop_instance_uid == "1.2.3.4"
    assert entries["05-no-series.dcm"].study_instance_uid == STUDY_UID


def test_instances_without_pixels_stay_in_the_study(make_dicom: MakeDicom,
                                                    tmp_path: Path) -> None:
    make_dicom("image.dcm", PIXELS)
    make_dicom("sr.dcm", None, SOPClassUID=ComprehensiveSRStorage, Modality="SR",
               SeriesInstanceUID=SERIES_UID + ".9")
    (study,) = collect(tmp_path).studies
    assert [s.modality for s in study.series] == ["OT", "SR"]


def test_paths_as_given(make_dicom: MakeDicom, tmp_path: Path) -> None:
    a = make_dicom("a.dcm", PIXELS)
    b = make_dicom("b.dcm", PIXELS)
    from_list = collect([b, a])
    assert [e.path for e in from_list.entries] == [b, a]
    single = collect(a)
    assert [e.path for e in single.entries] == [a]
    assert single.studies[0].series[0].instances[0].path == a
    (gone,) = collect([tmp_path / "gone.dcm"]).entries
    assert (gone.status, gone.reason) == ("failed", "no such file")


def test_to_json() -> None:
    entry = FileEntry(Path("in/x.dcm"), "failed", "not a DICOM file", None, None, None)
    assert entry.to_json() == {"path": "in/x.dcm", "status": "failed",
                               "reason": "not a DICOM file", "study_instance_uid": None}


@pytest.mark.parametrize("uid", ["../../x", "/tmp/x", "1.2.3/../../4", "1.02.3", "PID-8675309.1961",
                                 "1." + "2" * 63])
@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_an_invalid_uid_fails_the_file_without_quoting_it(make_dicom: MakeDicom, tmp_path: Path,
                                                         keyword: str, uid: str) -> None:
    path = make_dicom("a.dcm", PIXELS, **{keyword: uid})
    (entry,) = collect(tmp_path).entries
    assert entry.status == "failed"
    assert entry.reason is not None and uid not in entry.reason
    assert entry.reason.endswith(("(0020,000D)", "(0020,000E)", "(0008,0018)"))
    assert uid not in str(entry.to_json())
    assert entry.path == path


def test_truncated_copy_beside_the_intact_one_keeps_the_intact(make_dicom: MakeDicom,
                                                               tmp_path: Path) -> None:
    intact = make_dicom("b.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8))
    cut = tmp_path / "a.dcm"  # sorts first
    cut.write_bytes(intact.read_bytes()[:-40])
    result = collect(tmp_path)
    by_name = {e.path.name: e for e in result.entries}
    assert by_name["a.dcm"].status == "failed"
    assert by_name["a.dcm"].reason == "truncated: (7FE0,0010) holds 88 of 128 bytes"
    assert by_name["b.dcm"].status == "ok"
    assert [i.path for i in result.studies[0].instances] == [intact]


def test_an_unexpected_error_fails_one_file_only(make_dicom: MakeDicom, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    good = make_dicom("b.dcm", PIXELS)
    make_dicom("a.dcm", PIXELS)
    real = collect_module.is_dicomdir

    def explode(ds: Dataset) -> bool:
        if Path(ds.filename).name == "a.dcm":
            raise RuntimeError("value 'Doe^Jane'")
        return real(ds)

    monkeypatch.setattr(collect_module, "is_dicomdir", explode)
    result = collect(tmp_path)
    by_name = {e.path.name: e for e in result.entries}
    assert by_name["a.dcm"].status == "failed"
    assert by_name["a.dcm"].reason is not None
    assert by_name["a.dcm"].reason.startswith("internal error: RuntimeError at ")
    assert "Doe" not in by_name["a.dcm"].reason
    assert [i.path for i in result.studies[0].instances] == [good]
