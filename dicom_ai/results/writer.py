"""The one writer of our results: ``dicom-ai replay`` and the service both write through it.

Every object of a study goes into one folder as ``sc-…``/``seg-…``/``sr-<SOPInstanceUID>.dcm``
(:func:`dicom_ai.results.output_filename`, the names ``findings.json`` lists under ``outputs``),
each durably: a temporary file on the same file system, fsync, rename over the target, fsync of
the folder (:func:`dicom_ai.service.spool.durable_write`). ``findings.json`` is written last, so
the files it names exist whenever it does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from dicom_ai.results import output_filename
from dicom_ai.service.spool import durable_write

FINDINGS_NAME = "findings.json"


def encode(ds: Dataset) -> bytes:
    """A dataset in the DICOM file format; Explicit VR Little Endian unless it names another."""
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def findings_bytes(document: Mapping[str, Any]) -> bytes:
    """``findings.json`` as written: indented UTF-8 JSON, one trailing newline."""
    return json.dumps(document, indent=2, ensure_ascii=False).encode() + b"\n"


def write_results(folder: Path, datasets: Sequence[Dataset],
                  findings: Mapping[str, Any] | None, *, tmp_dir: Path | None = None
                  ) -> list[Path]:
    """Write a study's result objects, then its ``findings.json``, durably into ``folder``.

    Parameters
    ----------
    folder:
        The study's output folder; created when missing.
    datasets:
        The objects, in the order they should be stored (SCs and SEGs before their SR).
    findings:
        The ``findings.json`` document, or ``None`` to write none.
    tmp_dir:
        Where the partial files go (same file system as ``folder``); ``folder`` by default.

    Returns
    -------
    list of Path
        The object files, in the order of ``datasets``.

    Raises
    ------
    ValueError
        When an object's SOP Instance UID is not a valid UID (it names the file).
    """
    for ds in datasets:
        if not UID(str(ds.SOPInstanceUID)).is_valid:
            raise ValueError("a result object has an invalid SOP Instance UID")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir or folder
    paths = []
    for ds in datasets:
        path = folder / output_filename(ds)
        durable_write(path, [encode(ds)], tmp_dir=tmp)
        paths.append(path)
    if findings is not None:
        durable_write(folder / FINDINGS_NAME, [findings_bytes(findings)], tmp_dir=tmp)
    return paths
