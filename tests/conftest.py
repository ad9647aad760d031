"""Shared fixtures: single-threaded torch, and tiny DICOM files written on demand."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

#: Fixed UIDs so that files made by one test group into one study and series by default.
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.1.1"

MakeDicom = Callable[..., Path]


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    # Two shared cores and a training job may be running: tests must not fan out.
    torch.set_num_threads(1)
    yield


def image_dataset(pixels: npt.NDArray[Any] | None, **attrs: Any) -> Dataset:
    """A minimal valid instance around ``pixels`` (rows × cols [× 3], or frames first when
    ``NumberOfFrames`` is given); keyword arguments set or override any attribute by keyword.
    """
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = attrs.pop("SOPInstanceUID", None) or _next_uid()
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.Modality = "OT"
    ds.PatientName = "Test^Patient"
    ds.PatientID = "TEST-1"
    if pixels is not None:
        multi_frame = "NumberOfFrames" in attrs
        color = pixels.ndim == (4 if multi_frame else 3) and pixels.shape[-1] == 3
        ds.SamplesPerPixel = 3 if color else 1
        ds.PhotometricInterpretation = "RGB" if color else "MONOCHROME2"
        if color:
            ds.PlanarConfiguration = 0
        frame_shape = pixels.shape[1:] if multi_frame else pixels.shape
        ds.Rows, ds.Columns = int(frame_shape[0]), int(frame_shape[1])
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored = ds.BitsAllocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


_counter = iter(range(1, 10**9))


def _next_uid() -> str:
    return f"1.2.826.0.1.3680043.8.498.2.{next(_counter)}"


@pytest.fixture
def make_dicom(tmp_path: Path) -> MakeDicom:
    """``make_dicom(name, pixels=None, **attrs) -> Path``: write a file under ``tmp_path``."""

    def make(name: str, pixels: npt.NDArray[Any] | None = None, **attrs: Any) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image_dataset(pixels, **attrs).save_as(path, enforce_file_format=True)
        return path

    return make


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    d = tmp_path_factory.mktemp("certs")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", *key, "-days", "2", "-keyout", "ca.key", "-out", "ca.crt",
        "-subj", "/CN=dicom-ai test CA")
    for name in ("server", "client"):
        run("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext")
    return d
