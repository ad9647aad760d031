"""Training data: Kermany chest X-rays and RetinaMNIST fundus photographs, normalized once.

Every image goes through the same :mod:`dicom_ai.imaging` functions that prepare a DICOM at
inference time, then is cached as float16 under a scratch directory (never the repository), so
an epoch only reads an in-memory array.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from dicom_ai.imaging import dermoscopy, fundus, xray

#: Bumped whenever the caching code changes what lands in the array.
CACHE_VERSION = "1"

CXR_LABELS = ("normal", "pneumonia")
FUNDUS_LABELS = tuple(f"dr_grade_{g}" for g in range(5))
#: ISIC 2017 Part 3 diagnoses, in network output order.
DERM_LABELS = ("melanoma", "nevus", "seborrheic_keratosis")

_PERSON = re.compile(r"^(person\d+)_")
# NORMAL files are ``IM-0115-0001.jpeg``, ``IM-0429-0001-0002.jpeg`` (second image of the same
# study) and ``NORMAL2-IM-0637-0001.jpeg``. The same IM number occurs with and without the
# NORMAL2 prefix; nothing says these are different children, so they count as one patient.
_NORMAL = re.compile(r"^(?:NORMAL\d*-)?IM-(\d+)-")


@dataclass(frozen=True)
class ImageSet:
    """Normalized images (N×C×H×W float16 in [0, 1]), integer labels and patient keys."""

    images: npt.NDArray[np.float16]
    labels: npt.NDArray[np.int64]
    patients: tuple[str, ...]
    names: tuple[str, ...]

    def subset(self, index: npt.NDArray[np.int64]) -> ImageSet:
        """The images at ``index``, in that order."""
        return ImageSet(self.images[index], self.labels[index],
                        tuple(self.patients[i] for i in index),
                        tuple(self.names[i] for i in index))


def patient_key(file_name: str) -> str:
    """Patient identifier encoded in a Kermany file name.

    ``person1003_virus_1685.jpeg`` → ``person1003``; ``IM-0115-0001.jpeg`` and
    ``NORMAL2-IM-0115-0001.jpeg`` → ``IM-0115``.

    Raises
    ------
    ValueError
        If the name follows neither pattern.
    """
    base = Path(file_name).name
    if m := _PERSON.match(base):
        return m.group(1)
    if m := _NORMAL.match(base):
        return f"IM-{m.group(1)}"
    raise ValueError(f"no patient id in file name {base!r}")


def split_by_patient(patients: Sequence[str], labels: npt.NDArray[np.int64], *,
                     val_fraction: float, seed: int) -> tuple[npt.NDArray[np.int64],
                                                              npt.NDArray[np.int64]]:
    """Stratified train/validation split in which no patient is on both sides.

    Patients are stratified by their majority label; within each stratum a seeded shuffle puts
    ``round(val_fraction × n_patients)`` patients into validation.

    Returns
    -------
    train_index, val_index
        Sorted indices into ``patients``.
    """
    by_patient: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        by_patient.setdefault(p, []).append(i)
    strata: dict[int, list[str]] = {}
    for p, idx in sorted(by_patient.items()):
        majority = int(np.bincount(labels[idx]).argmax())
        strata.setdefault(majority, []).append(p)
    rng = np.random.default_rng(seed)
    val_patients: set[str] = set()
    for _label, members in sorted(strata.items()):
        order = rng.permutation(len(members))
        n_val = round(val_fraction * len(members))
        val_patients.update(members[j] for j in order[:n_val])
    val = np.array(sorted(i for p in val_patients for i in by_patient[p]), dtype=np.int64)
    train = np.setdiff1d(np.arange(len(patients), dtype=np.int64), val)
    return train, val


def cxr_model_input(path: Path, size: tuple[int, int]) -> npt.NDArray[np.float32]:
    """A Kermany JPEG → 1×H×W network input, through the same path as a MONOCHROME2 8-bit CR.

    The JPEGs are RGB with grey content; Pillow's ``L`` conversion (ITU-R 601 luma) gives the
    grey value, which equals each channel wherever the channels agree.
    """
    with Image.open(path) as im:
        gray = np.asarray(im.convert("L"), dtype=np.uint8)
    return xray.model_input(xray.presentation_from_8bit(gray), size, aspect="stretch")


def _cache_path(cache_dir: Path, kind: str, source: Path, size: tuple[int, int]) -> Path:
    tag = hashlib.sha1(f"{CACHE_VERSION}|{source.resolve()}|{size}".encode()).hexdigest()[:12]
    return cache_dir / f"{kind}-{size[0]}x{size[1]}-{tag}.npz"


def load_cxr(root: Path, size: tuple[int, int], cache_dir: Path) -> ImageSet:
    """All of ``root/train/{NORMAL,PNEUMONIA}``, normalized to ``size`` (cached).

    Labels: 0 = normal, 1 = pneumonia; order is the sorted file path.
    """
    cache = _cache_path(cache_dir, "cxr", root, size)
    files = sorted((root / "train").glob("*/*.jpeg"))
    if not files:
        raise FileNotFoundError(f"no JPEGs under {root / 'train'}")
    names = tuple(f"{f.parent.name}/{f.name}" for f in files)
    labels = np.array([0 if f.parent.name == "NORMAL" else 1 for f in files], dtype=np.int64)
    patients = tuple(patient_key(f.name) for f in files)
    if cache.exists():
        images = np.load(cache)["images"]
    else:
        images = np.stack([cxr_model_input(f, size) for f in files]).astype(np.float16)
        cache_dir.mkdir(parents=True, exist_ok=True)
        np.savez(cache, images=images)
    return ImageSet(images, labels, patients, names)


def load_fundus(npz: Path, size: tuple[int, int],
                cache_dir: Path) -> tuple[ImageSet, ImageSet]:
    """RetinaMNIST train and val splits through :func:`dicom_ai.imaging.fundus.model_input`.

    Each image is its own patient key (the release carries no patient identity; its official
    splits are already patient-disjoint).
    """
    cache = _cache_path(cache_dir, "fundus", npz, size)
    raw = np.load(npz)
    if cache.exists():
        stored = np.load(cache)
        arrays = {k: stored[k] for k in ("train", "val")}
    else:
        arrays = {k: np.stack([fundus.model_input(rgb, size) for rgb in raw[f"{k}_images"]])
                  .astype(np.float16) for k in ("train", "val")}
        cache_dir.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **arrays)
    sets = []
    for k in ("train", "val"):
        labels = raw[f"{k}_labels"].reshape(-1).astype(np.int64)
        names = tuple(f"{k}/{i}" for i in range(len(labels)))
        sets.append(ImageSet(arrays[k], labels, names, names))
    return sets[0], sets[1]


def dermoscopy_model_input(path: Path, size: tuple[int, int]) -> npt.NDArray[np.float32]:
    """An ISIC JPEG → 3×H×W network input, through the same path as an RGB dermoscopic DICOM."""
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return dermoscopy.model_input(rgb, size)


def load_isic(root: Path, size: tuple[int, int], cache_dir: Path) -> tuple[ImageSet, ImageSet]:
    """ISIC 2017 train and val splits from ``root/labels.csv``, normalized to ``size`` (cached).

    Labels index :data:`DERM_LABELS`. The release has no patient or lesion identifiers, so each
    image is its own patient key; its official splits are the challenge's.

    Raises
    ------
    ValueError
        If ``labels.csv`` names a label or split outside the release's.
    """
    with (root / "labels.csv").open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    sets = []
    for split in ("train", "val"):
        chosen = sorted((r for r in rows if r["split"] == split), key=lambda r: r["path"])
        if not chosen:
            raise ValueError(f"no {split!r} rows in {root / 'labels.csv'}")
        unknown = {r["label"] for r in chosen} - set(DERM_LABELS)
        if unknown:
            raise ValueError(f"unknown label(s) {sorted(unknown)} in {root / 'labels.csv'}")
        names = tuple(r["path"] for r in chosen)
        labels = np.array([DERM_LABELS.index(r["label"]) for r in chosen], dtype=np.int64)
        cache = _cache_path(cache_dir, f"isic-{split}", root, size)
        if cache.exists():
            images = np.load(cache)["images"]
        else:
            images = np.stack([dermoscopy_model_input(root / n, size) for n in names]) \
                .astype(np.float16)
            cache_dir.mkdir(parents=True, exist_ok=True)
            np.savez(cache, images=images)
        sets.append(ImageSet(images, labels, names, names))
    return sets[0], sets[1]
