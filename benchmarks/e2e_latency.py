"""End-to-end latency: storescu → ``dicom-ai serve`` → results in Orthanc, per modality.

Orthanc (its own process, temp dir) is the PACS ``serve`` delivers to. Each case is a sample
study sent with DCMTK ``storescu`` (``TCP_NODELAY=1``) with fresh Study/Series/SOP Instance UIDs
every time (so neither ``serve`` nor Orthanc has seen it); the clock starts when the last
instance is acknowledged and stops when the first SR of the study is listed by Orthanc's REST
API (polled every 50 ms), and again when every result (SR, SC, SEG) is delivered. The figure
reported is that time **minus the configured wait** of the completion rule that closed the
study (``studies.completed_rule`` in the index → the setting it stands for), and the index
splits it into the wait actually spent, the queue, the analysis and the export.

Cases: every sample chest X-ray, fundus and dermoscopy photograph, the fracture film, the sample
CT series (30 slices) and a 300-slice CT made from the sample CT's real slices (each repeated
ten times in a row at a tenth of the spacing: the same chest as a thin-slice reconstruction, new
positions and UIDs). Then 8 sample studies sent at once (8 associations) against the slowest of
them alone. ``--runs`` alternating trials; medians. Settings: today's defaults of ``serve``
except ``studies.quiet_period_s`` (``--quiet-period``, 5 s: the wait is subtracted, a shorter one
only makes the run quicker); ``--serve-setting section.key=value`` and ``DICOM_AI_*`` variables
add or override any (completion rules, worker pool, lanes). Usage::

    python benchmarks/e2e_latency.py [--runs 3] [--serve-setting worker.processes=2]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from cstore_receive import (
    ENV,
    REPO,
    Receiver,
    free_port,
    load,
    machine,
    start_serve,
    wait_http,
    wait_port,
)
from pydicom.uid import generate_uid

from dicom_ai.config import load_settings

SAMPLES = REPO / "sample_studies"
CT_SAMPLE = "ct-lung-pet-ct-dx-a0002"
#: The 300-slice CT: each real slice repeated this many times, at spacing / REPEAT.
CT_LARGE_SLICES, REPEAT = 300, 10
#: Sent at once in the "together" case (the 8 of the original measurement: 4 CXR, 2 fundus,
#: a dermoscopy photograph and the CT).
TOGETHER = ("cxr01", "cxr02", "cxr03", "cxr04", "fundus01", "fundus02", "derm01", CT_SAMPLE)
#: Longest wait for one study's results (seconds), and the poll interval.
RESULT_TIMEOUT_S, POLL_S = 300.0, 0.05
#: storescu's option that proposes a compressed transfer syntax (it offers uncompressed only by
#: default and would try to decompress).
PROPOSE = {"1.2.840.10008.1.2.5": ["-xr"], "1.2.840.10008.1.2.4.90": ["-xv"],
           "1.2.840.10008.1.2.4.80": ["-xt"], "1.2.840.10008.1.2.4.50": ["-xy"],
           "1.2.840.10008.1.2.4.70": ["-xs"], "1.2.840.10008.1.2.4.57": ["-xs"]}
ALONE = ("cxr01", "cxr02", "cxr03", "cxr04", "fundus01", "fundus02", "derm01", "fracture01",
         CT_SAMPLE, "ct-300")
TARGETS_S = {"CXR": 2.0, "CT 300 slices": 20.0}
TOGETHER_TARGET = 1.5


class Study:
    """One source study whose instances get new UIDs on every :meth:`write`.

    The template's Study/Series/SOP Instance UIDs (data set and file meta) are
    ``<root>.1000000.<n>`` with a random 2.25 ``<root>``; a write swaps ``1000000`` for a new
    seven-digit number in the bytes (same lengths, so the encoding stays valid).
    """

    numbers = itertools.count(1000001)

    def __init__(self, name: str, datasets: Sequence[pydicom.Dataset]) -> None:
        self.name = name
        self.transfer_syntax = str(datasets[0].file_meta.TransferSyntaxUID)
        self.root = generate_uid(prefix="2.25.")[:40]
        n = itertools.count()
        study = f"{self.root}.1000000.{next(n)}"
        series: dict[str, str] = {}
        self.templates: list[bytes] = []
        for ds in datasets:
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series.setdefault(str(ds.SeriesInstanceUID),
                                                     f"{self.root}.1000000.{next(n)}")
            ds.SOPInstanceUID = f"{self.root}.1000000.{next(n)}"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            with tempfile.SpooledTemporaryFile() as buf:
                ds.save_as(buf, enforce_file_format=True)
                buf.seek(0)
                self.templates.append(buf.read())

    def write(self, out: Path) -> tuple[str, list[Path]]:
        """A fresh copy under ``out``: its Study Instance UID and files."""
        number = next(self.numbers)
        old, new = f"{self.root}.1000000.".encode(), f"{self.root}.{number}.".encode()
        folder = out / f"{self.name}-{number}"
        folder.mkdir(parents=True)
        paths = []
        for i, data in enumerate(self.templates):
            path = folder / f"{i:04d}.dcm"
            path.write_bytes(data.replace(old, new))
            paths.append(path)
        return f"{self.root}.{number}.0", paths


def sample(name: str) -> Study:
    """A study of ``sample_studies/``."""
    return Study(name, [pydicom.dcmread(p) for p in sorted((SAMPLES / name).rglob("*.dcm"))])


def thin_ct(slices: int = CT_LARGE_SLICES, repeat: int = REPEAT,
            name: str = "ct-300") -> Study:
    """The sample CT's real slices, each repeated ``repeat`` times at ``spacing / repeat``."""
    return Study(name, thin_ct_datasets(slices, repeat))


def thin_ct_datasets(slices: int, repeat: int) -> list[pydicom.Dataset]:
    """``slices`` CT data sets: real slice ``k // repeat`` of the sample series at position
    ``first + k · spacing / repeat`` along its normal, one new series; the stack is cycled
    (continuing the positions) when more slices are asked for than ``30 · repeat``."""
    import numpy as np

    source = [pydicom.dcmread(p) for p in sorted((SAMPLES / CT_SAMPLE).rglob("*.dcm"))]
    iop = np.asarray([float(v) for v in source[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    source.sort(key=lambda ds: float(np.asarray(ds.ImagePositionPatient, dtype=float) @ normal))
    first = np.asarray([float(v) for v in source[0].ImagePositionPatient])
    depth = [float(np.asarray(ds.ImagePositionPatient, dtype=float) @ normal) for ds in source]
    step = (depth[-1] - depth[0]) / (len(source) - 1) / repeat
    series = generate_uid()
    out: list[pydicom.Dataset] = []
    for k in range(slices):
        ds = copy.deepcopy(source[(k // repeat) % len(source)])
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in first + normal * step * k]
        ds.SliceLocation = f"{float(first @ normal + step * k):.4f}"
        ds.SliceThickness = f"{step:.4f}"
        out.append(ds)
    return out


@dataclass
class Timing:
    """One study's way through the service, seconds after its last instance was acknowledged."""

    case: str
    first_sr_s: float
    all_results_s: float
    configured_wait_s: float
    rule: str
    waited_s: float
    queued_s: float
    analysed_s: float
    exported_s: float
    results: int

    @property
    def net_s(self) -> float:
        """Last instance → first SR in the PACS, minus the configured wait."""
        return self.first_sr_s - self.configured_wait_s


def orthanc_find_sr(http: int, study_uid: str) -> bool:
    """Whether Orthanc lists an SR series in the study."""
    body = json.dumps({"Level": "Series", "Query": {"StudyInstanceUID": study_uid,
                                                    "Modality": "SR"}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{http}/tools/find", data=body,
                                     method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return bool(json.loads(response.read()))


def index_row(index: Path, study_uid: str) -> dict[str, object] | None:
    """The study's completion, latest job and deliveries from the ``serve`` index."""
    try:
        conn = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return None
    try:
        conn.row_factory = sqlite3.Row
        columns = {r[1] for r in conn.execute("PRAGMA table_info(studies)")}
        rule = "completed_rule" if "completed_rule" in columns else "NULL"
        study = conn.execute(f"SELECT last_received, completed_at, {rule} AS rule FROM studies "
                             "WHERE study_instance_uid = ?", (study_uid,)).fetchone()
        job = conn.execute("SELECT state, created_at, started_at, finished_at, outputs FROM jobs "
                           "WHERE study_instance_uid = ? ORDER BY generation DESC LIMIT 1",
                           (study_uid,)).fetchone()
        out = conn.execute("SELECT COUNT(*) AS n, SUM(state = 'delivered') AS done, "
                           "MAX(delivered_at) AS last FROM outbound "
                           "WHERE study_instance_uid = ?", (study_uid,)).fetchone()
        if study is None or job is None:
            return None
        return {**dict(study), **{f"job_{k}": v for k, v in dict(job).items()},
                **{f"out_{k}": v for k, v in dict(out).items()}}
    except sqlite3.Error:
        return None
    finally:
        conn.close()


class Bench:
    """A running Orthanc and ``serve`` delivering to it."""

    def __init__(self, scratch: Path, args: argparse.Namespace) -> None:
        self.scratch = scratch
        self.http, port = free_port(), free_port()
        root = scratch / "orthanc"
        (root / "storage").mkdir(parents=True)
        config = {"Name": "e2e", "DicomAet": "ORTHANC", "DicomPort": port, "HttpPort": self.http,
                  "StorageDirectory": str(root / "storage"),
                  "IndexDirectory": str(root / "storage"), "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "Plugins": []}
        (root / "config.json").write_text(json.dumps(config))
        with (root / "orthanc.log").open("wb") as log:
            self.orthanc = subprocess.Popen(["Orthanc", str(root / "config.json")], env=ENV,
                                            stdout=log, stderr=subprocess.STDOUT, cwd=root)
        wait_http(f"http://127.0.0.1:{self.http}/system")
        wait_port(port)
        tables = (f'[[export.destinations]]\nname = "pacs"\nkind = "dimse"\n'
                  f'ae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {port}\n')
        self.serve: Receiver = start_serve(scratch, "serve", args.models, args.quiet_period,
                                           args.serve_setting, tables)
        self.index = scratch / "serve" / "index.sqlite"
        self.settings = load_settings(scratch / "serve.toml")
        self.calling = itertools.count()

    def stop(self) -> None:
        """Stop ``serve`` and Orthanc."""
        self.serve.stop()
        self.orthanc.terminate()
        self.orthanc.wait(timeout=30)

    def configured_wait(self, rule: str | None) -> float:
        """The setting behind a completion rule's name (``studies.*``), in seconds."""
        studies = self.settings.studies
        name = (rule or "quiet_period").lower()
        if "single" in name:
            return float(getattr(studies, "single_image_quiet_period_s", studies.quiet_period_s))
        if "max" in name or "forced" in name:
            return float(getattr(studies, "maximum_wait_s", 0.0))
        if "quiet" in name:
            return float(studies.quiet_period_s)
        # Expected counts met, a manifest, an MPPS COMPLETED: events, no wait configured.
        return 0.0

    def send(self, study: Study, out: Path) -> tuple[str, float, subprocess.Popen[bytes]]:
        """Start sending a fresh copy of ``study``; its UID, start time and the storescu."""
        uid, files = study.write(out)
        # The samples are RLE, JPEG, JPEG-LS, JPEG 2000 as well as uncompressed: propose the
        # files' own transfer syntax, as a PACS forwarding them unchanged does.
        propose = ["-R", *PROPOSE.get(study.transfer_syntax, [])]
        proc = subprocess.Popen(["storescu", *propose, "-aet", f"E2E{next(self.calling) % 100}",
                                 "-aec", "DICOMAI", "127.0.0.1", str(self.serve.port),
                                 *map(str, files)], env=ENV, stdout=subprocess.DEVNULL)
        return uid, time.time(), proc

    def run(self, studies: Sequence[Study], out: Path) -> list[Timing]:
        """Send ``studies`` at once; wait for each one's results; their timings."""
        sent = [self.send(s, out) for s in studies]
        last: dict[str, float] = {}
        sr: dict[str, float] = {}
        deadline = time.monotonic() + RESULT_TIMEOUT_S
        rows: dict[str, dict[str, object]] = {}
        while len(rows) < len(sent):
            if time.monotonic() > deadline:
                missing = [s.name for s, (u, _, _) in zip(studies, sent, strict=True)
                           if u not in rows]
                raise TimeoutError(f"no results after {RESULT_TIMEOUT_S:.0f} s for {missing}")
            for study, (uid, _, proc) in zip(studies, sent, strict=True):
                if uid not in last and proc.poll() is not None:
                    if proc.returncode:
                        raise RuntimeError(f"storescu of {study.name} failed: {proc.returncode}")
                    last[uid] = time.time()
                if uid in last and uid not in sr and orthanc_find_sr(self.http, uid):
                    sr[uid] = time.time()
                if uid in last and uid not in rows:
                    row = index_row(self.index, uid)
                    if row is None:
                        continue
                    if row["job_state"] == "failed" or (row["job_state"] == "done"
                                                        and not row["out_n"]):
                        raise RuntimeError(f"{study.name}: job {row['job_state']} with "
                                           f"{row['out_n']} results; see {self.scratch}")
                    if uid in sr and row["out_n"] and row["out_done"] == row["out_n"]:
                        rows[uid] = row
            time.sleep(POLL_S)
        timings = []
        for study, (uid, _, _) in zip(studies, sent, strict=True):
            print(f"  {study.name}: first SR {sr[uid] - last[uid]:.2f} s after its last image",
                  file=sys.stderr, flush=True)
            row, t0 = rows[uid], last[uid]
            rule = str(row["rule"]) if row["rule"] is not None else "quiet_period"
            timings.append(Timing(
                case=study.name, first_sr_s=sr[uid] - t0,
                all_results_s=float(row["out_last"]) - t0,  # type: ignore[arg-type]
                configured_wait_s=self.configured_wait(rule), rule=rule,
                waited_s=float(row["completed_at"]) - t0,  # type: ignore[arg-type]
                queued_s=float(row["job_started_at"])  # type: ignore[arg-type]
                - float(row["completed_at"]),  # type: ignore[arg-type]
                analysed_s=float(row["job_finished_at"])  # type: ignore[arg-type]
                - float(row["job_started_at"]),  # type: ignore[arg-type]
                exported_s=sr[uid] - float(row["job_finished_at"]),  # type: ignore[arg-type]
                results=int(row["out_n"])))  # type: ignore[call-overload]
        return timings


def group(case: str) -> str:
    """The modality row a case belongs to."""
    for prefix, label in (("cxr", "CXR"), ("fundus", "fundus"), ("derm", "dermoscopy"),
                          ("fracture", "fracture film"), (CT_SAMPLE, "CT sample (30 slices)"),
                          ("ct-300", "CT 300 slices")):
        if case.startswith(prefix):
            return label
    return case


def median(values: Sequence[float]) -> float:
    """The median (of at least one value)."""
    return float(statistics.median(values))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quiet-period", type=float, default=5.0,
                        help="studies.quiet_period_s of serve (subtracted from the figures)")
    parser.add_argument("--serve-setting", action="append", default=[], metavar="S.K=V",
                        help="extra serve setting, e.g. worker.processes=2")
    parser.add_argument("--no-together", action="store_true",
                        help="skip the 8-studies-at-once case")
    parser.add_argument("--cases", default=",".join(ALONE),
                        help="studies sent alone (sample names, ct-300)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    before = load()
    alone_cases = [c for c in args.cases.split(",") if c != "ct-300"]
    if not args.no_together:
        alone_cases += [n for n in TOGETHER if n not in alone_cases]
    scratch = Path(tempfile.mkdtemp(prefix="e2e-bench-", dir=REPO.parent))
    try:
        studies = {name: sample(name) for name in alone_cases}
        if "ct-300" in args.cases.split(","):
            studies["ct-300"] = thin_ct()
        bench = Bench(scratch, args)
        alone: list[Timing] = []
        together: list[list[Timing]] = []
        try:
            order = list(studies)
            for trial in range(args.runs):
                for name in order[trial % len(order):] + order[:trial % len(order)]:
                    alone.extend(bench.run([studies[name]], scratch / "sends"))
                if not args.no_together:
                    together.append(bench.run([studies[n] for n in TOGETHER],
                                              scratch / "sends"))
            settings_text = (scratch / "serve.toml").read_text()
        finally:
            bench.stop()
    finally:
        if args.keep:
            print(f"kept {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch)
    report(alone, together, args, before, settings_text)
    return 0


def report(alone: list[Timing], together: list[list[Timing]], args: argparse.Namespace,
           before: str, settings_text: str) -> None:
    """Print the README tables."""
    settings = tomllib.loads(settings_text)
    shown = {k: v for k, v in settings.items() if k in ("studies", "worker")}
    print(f"End to end: storescu → dicom-ai serve → Orthanc (C-STORE), one study at a time, "
          f"{args.runs} alternating trials, medians; fresh UIDs every send")
    print(f"Machine: {machine()}; load average before {before}, after {load()}")
    print(f"serve settings (others default): {json.dumps(shown)}"
          + (f"; added: {', '.join(args.serve_setting)}" if args.serve_setting else ""))
    print()
    print("| study | last image → first SR in Orthanc | **minus configured wait** (rule) | "
          "wait spent | queue | analysis | export to first SR | all results | objects |")
    print("|---|---|---|---|---|---|---|---|---|")
    groups: dict[str, list[Timing]] = {}
    for t in alone:
        groups.setdefault(group(t.case), []).append(t)
    for label, ts in groups.items():
        rules = sorted({f"{t.rule} {t.configured_wait_s:g} s" for t in ts})
        print(f"| {label} ({len(ts)}) | {median([t.first_sr_s for t in ts]):.2f} s | "
              f"**{median([t.net_s for t in ts]):.2f} s** ({', '.join(rules)}) | "
              f"{median([t.waited_s for t in ts]):.2f} s | {median([t.queued_s for t in ts]):.2f} s"
              f" | {median([t.analysed_s for t in ts]):.2f} s | "
              f"{median([t.exported_s for t in ts]):.2f} s | "
              f"{median([t.all_results_s for t in ts]):.2f} s | "
              f"{median([t.results for t in ts]):.0f} |")
    print()
    for label, target in TARGETS_S.items():
        if label in groups:
            value = median([t.net_s for t in groups[label]])
            print(f"Target {label} ≤ {target:g} s: {value:.2f} s — "
                  f"{'met' if value <= target else 'NOT met'}")
    if together:
        slowest_alone = max(median([t.net_s for t in alone if t.case == name])
                            for name in TOGETHER)
        worst = [max(t.net_s for t in run) for run in together]
        ratio = median(worst) / slowest_alone
        print()
        print(f"| {len(TOGETHER)} studies sent at once ({', '.join(TOGETHER)}) | value |")
        print("|---|---|")
        print(f"| slowest alone (median, minus wait) | {slowest_alone:.2f} s |")
        print(f"| last of the {len(TOGETHER)} together (median of {len(worst)}, minus wait) | "
              f"{median(worst):.2f} s (runs: {', '.join(f'{w:.1f}' for w in worst)}) |")
        fast = [t.net_s for run in together for t in run if group(t.case) == "CXR"]
        print(f"| CXR among them (median, minus wait) | {median(fast):.2f} s |")
        print(f"| **ratio together / slowest alone** | **{ratio:.2f}** |")
        print()
        print(f"Target together ≤ {TOGETHER_TARGET}× slowest alone: {ratio:.2f} — "
              f"{'met' if ratio <= TOGETHER_TARGET else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
