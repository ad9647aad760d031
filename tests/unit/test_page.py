"""The status page: what it shows from a real index and real result files, what it never shows
(patient identity planted in the source, our SC and ``findings.json``), escaping, the token, and
thumbnail requests that try to leave ``outputs/``."""

from __future__ import annotations

import json
import shutil
import sqlite3
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from PIL import Image

import tests.results_fixtures as fx
from dicom_ai import DISCLAIMER
from dicom_ai.results import build_outputs, findings_document
from dicom_ai.results.writer import findings_bytes, write_results
from dicom_ai.service import db, queries
from dicom_ai.service.page import Response, handle, open_index
from dicom_ai.service.page.render import ago, render_page

#: Identity written into the source header (valid values, so our SC copies them as they are).
NAME, PATIENT_ID, BIRTH_DATE = "Zzqx^Yyvw", "PID8675309", "19610704"
IDENTITY = ("Zzqx", "Yyvw", "8675309", "19610704")
NOW = 1_800_000_000.0
REASON = "association rejected: <b>Calling AE title</b> not recognised & \"quoted\""


@dataclass
class Storage:
    root: Path
    study: str
    sc: str
    sr: str


def _insert_study(conn: sqlite3.Connection, study: str, *, job: str = "done") -> None:
    conn.execute("INSERT INTO studies (study_instance_uid, state, generation, instance_count, "
                 "first_received, last_received, completed_at) "
                 "VALUES (?, 'complete', 1, 1, ?, ?, ?)", (study, NOW - 300, NOW - 290, NOW - 250))
    conn.execute("INSERT INTO jobs (study_instance_uid, generation, state, attempts, outputs, "
                 "created_at, started_at, finished_at) VALUES (?, 1, ?, 1, 3, ?, ?, ?)",
                 (study, job, NOW - 250, NOW - 240, NOW - 200))


def _outbound(conn: sqlite3.Connection, study: str, ds: pydicom.Dataset, destination: str,
              state: str, *, attempts: int = 1, error: str | None = None) -> None:
    conn.execute(
        "INSERT INTO outbound (job_id, study_instance_uid, sop_instance_uid, sop_class_uid, "
        "path, destination, state, attempts, next_attempt_at, last_error, created_at, "
        "delivered_at) VALUES (1, ?, ?, ?, 'x', ?, ?, ?, ?, ?, ?, ?)",
        (study, str(ds.SOPInstanceUID), str(ds.SOPClassUID), destination, state, attempts,
         NOW + 30, error, NOW - 200, NOW - 190 if state == "delivered" else None))


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    """A storage directory as the service leaves it after one chest radiograph: the received
    instance, its index rows, our SC, SR and ``findings.json`` (written by the real writer),
    one delivery done, one pending after a failure and one dead letter."""
    root = tmp_path / "storage"
    source = pydicom.dcmread(fx.data_path(fx.DX_FILE))
    source.PatientName, source.PatientID, source.PatientBirthDate = NAME, PATIENT_ID, BIRTH_DATE
    study, series = str(source.StudyInstanceUID), str(source.SeriesInstanceUID)
    received = root / "incoming" / study / series / f"{source.SOPInstanceUID}.dcm"
    received.parent.mkdir(parents=True)
    source.save_as(received)
    result = fx.dx_result(path=received)
    datasets = build_outputs([result], fx.settings(), codes=fx.CODES, finding_site=fx.LUNG)
    document = findings_document(study, [result])
    # Keys the page does not know must never be rendered, whatever they hold.
    document["patient"] = {"name": NAME, "id": PATIENT_ID}
    document["results"][0]["PatientBirthDate"] = BIRTH_DATE
    document["results"][0]["findings"][0]["note"] = NAME
    write_results(root / "outputs" / study, datasets, document)
    sc, sr = (str(ds.SOPInstanceUID) for ds in datasets)
    conn = db.connect(root / "index.sqlite")
    conn.execute("INSERT INTO instances (sop_instance_uid, study_instance_uid, "
                 "series_instance_uid, sop_class_uid, path, size, calling_aet, received_at) "
                 "VALUES (?, ?, ?, ?, ?, 1, 'MODALITY', ?)",
                 (str(source.SOPInstanceUID), study, series, str(source.SOPClassUID),
                  str(received.relative_to(root)), NOW - 290))
    _insert_study(conn, study)
    _outbound(conn, study, datasets[0], "pacs", "delivered")
    _outbound(conn, study, datasets[1], "pacs", "pending", attempts=2, error="connection refused")
    _outbound(conn, study, datasets[1], "archive", "dead", attempts=6, error=REASON)
    conn.close()
    return Storage(root, study, sc, sr)


def get(storage: Storage, target: str, *, token: str | None = None,
        headers: dict[str, str] | None = None) -> Response:
    return handle(storage.root, "GET", target, headers or {}, token=token)


def page_text(storage: Storage) -> str:
    with open_index(storage.root) as conn:
        return render_page(conn, storage.root, now=NOW).decode()


def test_the_planted_identity_is_in_the_files_the_page_reads(storage: Storage) -> None:
    # Otherwise the tests below could not fail.
    out = storage.root / "outputs" / storage.study
    sc = pydicom.dcmread(out / f"sc-{storage.sc}.dcm", stop_before_pixels=True)
    assert str(sc.PatientName) == NAME and sc.PatientID == PATIENT_ID
    assert NAME in (out / "findings.json").read_text()


def test_page_shows_study_findings_thumbnail_queue_destinations_dead_letters(
        storage: Storage) -> None:
    page = page_text(storage)
    assert DISCLAIMER in page
    assert storage.study in page
    assert "<td>DX</td>" in page  # the Modality element of the received instance
    assert "cxr-pneumonia" in page and "1.0.0" in page
    assert "<td>pneumonia</td><td class=num>0.873</td><td class=num>0.540</td>" in page
    assert "<td>normal</td><td class=num>0.127</td>" in page
    assert f'src="/thumbnails/{storage.study}/{storage.sc}.png"' in page
    assert "2027-01-15 07:55:10" in page  # last instance received, UTC
    # Queue: one job, done. Destinations: pacs retrying, archive failing; the dead letter's
    # reason escaped.
    assert "<td class=num>0</td><td class=num>0</td><td class=num>1</td>" in page
    assert '<td>pacs</td><td><span class="badge retrying">retrying</span></td>' in page
    assert '<td>archive</td><td><span class="badge failing">failing</span></td>' in page
    assert "connection refused" in page
    sr_class = str(pydicom.dcmread(storage.root / "outputs" / storage.study /
                                   f"sr-{storage.sr}.dcm", stop_before_pixels=True).SOPClassUID)
    kind = {"1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
            "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR"}[sr_class]
    assert page.count(f"<td>{kind}</td>") == 2  # retrying and dead
    assert ("association rejected: &lt;b&gt;Calling AE title&lt;/b&gt; not recognised &amp; "
            "&quot;quoted&quot;") in page
    assert "<b>" not in page


def test_page_never_shows_patient_identity(storage: Storage) -> None:
    page = page_text(storage)
    assert [f for f in IDENTITY if f in page] == []
    png = get(storage, f"/thumbnails/{storage.study}/{storage.sc}.png")
    assert png.status == 200
    assert [f for f in IDENTITY if f.encode() in png.body] == []


def test_page_loads_nothing_from_elsewhere(storage: Storage) -> None:
    response = get(storage, "/")
    assert response.status == 200 and response.content_type == "text/html; charset=utf-8"
    page = response.body.decode()
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["Cache-Control"] == "no-store"


def test_thumbnail_is_a_bounded_png_of_the_sc(storage: Storage) -> None:
    response = get(storage, f"/thumbnails/{storage.study}/{storage.sc}.png")
    assert response.status == 200 and response.content_type == "image/png"
    picture = Image.open(BytesIO(response.body))
    assert picture.format == "PNG" and max(picture.size) == 256
    sc = pydicom.dcmread(storage.root / "outputs" / storage.study / f"sc-{storage.sc}.dcm")
    assert picture.size[0] / picture.size[1] == pytest.approx(sc.Columns / sc.Rows, rel=0.02)


@pytest.mark.parametrize("target", [
    "/thumbnails/../index.sqlite.png",
    "/thumbnails/%2e%2e/%2e%2e.png",
    "/thumbnails/..%2f..%2fetc/passwd.png",
    "/thumbnails/1.2.3/..png",
    "/thumbnails/01.2/1.2.png",
    "/thumbnails/1.2.3/1.2.3 .png",
    "/thumbnails/1.2.3/" + "1." * 40 + "1.png",
])
def test_thumbnail_not_named_by_uids_is_refused(storage: Storage, target: str) -> None:
    assert get(storage, target).status in (400, 404)


def test_thumbnail_traversal_out_of_outputs_is_refused(storage: Storage) -> None:
    # A file that exists outside outputs/, named the way a traversal would reach it.
    (storage.root / "outputs" / "sc-1.2.dcm").write_bytes(b"x")
    assert get(storage, "/thumbnails/../sc-1.2.png").status in (400, 404)
    assert get(storage, "/thumbnails/..%2F/1.2.png").status == 400
    assert get(storage, "/thumbnails/./1.2.png").status == 400


def test_thumbnail_only_of_our_sc_in_its_own_study(storage: Storage) -> None:
    # The SR is not a picture; a valid pair with no file; the SC copied under another study.
    assert get(storage, f"/thumbnails/{storage.study}/{storage.sr}.png").status == 404
    assert get(storage, f"/thumbnails/{storage.study}/1.2.3.4.png").status == 404
    other = storage.root / "outputs" / "1.2.3"
    other.mkdir()
    shutil.copy(storage.root / "outputs" / storage.study / f"sc-{storage.sc}.dcm",
                other / f"sc-{storage.sc}.dcm")
    assert get(storage, f"/thumbnails/1.2.3/{storage.sc}.png").status == 404


def test_findings_are_escaped(storage: Storage) -> None:
    path = storage.root / "outputs" / storage.study / "findings.json"
    document = json.loads(path.read_text())
    document["results"][0]["model"]["name"] = '"><img src=x onerror=alert(1)>'
    document["results"][0]["findings"][0]["label"] = "<script>alert(1)</script>"
    document["results"][0]["outputs"].append("sc-1.2\"><script>.dcm")
    path.write_bytes(findings_bytes(document))
    page = page_text(storage)
    assert "<script" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page


def test_unreadable_or_foreign_findings_are_reported_not_rendered(storage: Storage) -> None:
    path = storage.root / "outputs" / storage.study / "findings.json"
    path.write_bytes(findings_bytes({"study_instance_uid": "1.2.3", "results": [
        {"model": {"name": NAME}}]}))
    page = page_text(storage)
    assert "findings.json is not this study&#x27;s" in page and NAME not in page
    path.write_bytes(b"{not json")
    assert "findings.json is unreadable" in page_text(storage)


def test_token_is_required_when_set(storage: Storage) -> None:
    secret = "s3cr\u00e9t/+&"
    thumb = f"/thumbnails/{storage.study}/{storage.sc}.png"
    for target in ("/", thumb, "/?token=wrong", "/?token="):
        response = get(storage, target, token=secret)
        assert response.status == 401 and storage.study not in response.body.decode()
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert get(storage, "/", token=secret,
               headers={"Authorization": "Basic " + secret}).status == 401
    assert get(storage, "/", token=secret,
               headers={"authorization": f"Bearer {secret}"}).status == 200
    assert get(storage, thumb, token=secret,
               headers={"Authorization": f"bearer {secret}"}).status == 200
    quoted = "s3cr%C3%A9t%2F%2B%26"
    response = get(storage, f"/?token={quoted}", token=secret)
    assert response.status == 200
    # An <img> sends no Authorization header: its link carries the token it was given.
    assert f"{thumb}?token={quoted}" in response.body.decode()
    assert get(storage, f"{thumb}?token={quoted}", token=secret).status == 200
    # No token configured: none needed, and none put into links.
    assert "?token=" not in get(storage, f"/?token={quoted}").body.decode()


def test_other_paths_methods_and_a_missing_index(storage: Storage, tmp_path: Path) -> None:
    assert get(storage, "/metrics").status == 404
    assert get(storage, "/index.sqlite").status == 404
    assert handle(storage.root, "POST", "/", {}).status == 405
    assert handle(tmp_path / "nowhere", "GET", "/", {}).status == 503


def test_page_opens_the_index_read_only(storage: Storage) -> None:
    with open_index(storage.root) as conn, pytest.raises(sqlite3.OperationalError):
        conn.execute("DELETE FROM outbound")
    conn.close()


def test_an_empty_index(tmp_path: Path) -> None:
    db.connect(tmp_path / "index.sqlite").close()
    page = handle(tmp_path, "GET", "/", {}).body.decode()
    assert "no study received yet" in page and "nothing queued for delivery yet" in page
    assert DISCLAIMER in page


def test_study_without_results_yet(storage: Storage) -> None:
    conn = db.connect(storage.root / "index.sqlite")
    conn.execute("INSERT INTO studies (study_instance_uid, state, generation, instance_count, "
                 "first_received, last_received) VALUES ('1.2.3', 'receiving', 1, 4, ?, ?)",
                 (NOW - 5, NOW - 1))
    conn.close()
    page = page_text(storage)
    assert page.index("1.2.3</span>") < page.index(storage.study)  # newest first
    assert "no results yet" in page


def test_destination_counts(storage: Storage) -> None:
    with open_index(storage.root) as conn:
        rows = {d.destination: d for d in queries.destinations(conn)}
        counts = queries.job_counts(conn)
    conn.close()
    assert (rows["pacs"].pending, rows["pacs"].delivered, rows["pacs"].retrying) == (1, 1, 1)
    assert (rows["archive"].dead, rows["archive"].pending) == (1, 0)
    assert counts == {"queued": 0, "running": 0, "done": 1, "failed": 0, "superseded": 0}


def test_ago() -> None:
    assert [ago(NOW - s, NOW) for s in (5, 119, 120, 7199, 7200, 3 * 86400)] == \
        ["5 s", "119 s", "2 min", "119 min", "2 h", "3 d"]
    assert ago(NOW + 10, NOW) == "0 s"


def test_measurements_candidates_and_rejections(storage: Storage) -> None:
    study = "1.2.3"
    conn = db.connect(storage.root / "index.sqlite")
    _insert_study(conn, study)
    conn.close()
    (storage.root / "outputs" / study).mkdir()
    (storage.root / "outputs" / study / "findings.json").write_bytes(findings_bytes({
        "study_instance_uid": study, "results": [
            {"series_instance_uid": "1.2.3.1", "model": {"name": "ct-lung", "version": "0.2.0"},
             "status": "ok", "outputs": ["seg-1.2.3.9.dcm", "sr-1.2.3.8.dcm"], "findings": [
                 {"label": "lung_volume", "value": 4523.12345, "unit": "ml"},
                 {"label": "nodule", "probability": 0.31, "positive": False,
                  "operating_point": 0.5, "center_mm": [1.0, 2.0, 3.0]}]},
            {"series_instance_uid": "1.2.3.2", "model": {"name": "ct-lung", "version": "0.2.0"},
             "status": "rejected", "reason": "slice thickness 10 mm above 5 mm",
             "findings": [], "outputs": []},
            {"series_instance_uid": "../../x", "model": "not a mapping", "status": 7,
             "findings": "none", "outputs": [1, None]}]}))
    page = page_text(storage)
    assert "<td>lung_volume</td><td class=num></td><td class=num></td><td></td>" \
           "<td class=num>4523.12 ml</td>" in page
    assert "<td>nodule</td><td class=num>0.310</td><td class=num>0.500</td><td>negative</td>" \
        in page
    assert '<span class="badge rejected">rejected</span>' in page
    assert "Reason: slice thickness 10 mm above 5 mm" in page
    # A malformed result is shown as unknown, with nothing of its malformed values.
    assert "../../x" not in page and "not a mapping" not in page
    assert page.count("<h3>?") == 1
    # Only SC files become thumbnails.
    assert "/thumbnails/1.2.3/" not in page
