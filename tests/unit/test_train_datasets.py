"""Kermany patient keys and the patient-level validation split."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_ai.train.datasets import patient_key, split_by_patient


@pytest.mark.parametrize(("name", "key"), [
    ("person1003_virus_1685.jpeg", "person1003"),
    ("person1003_bacteria_2934.jpeg", "person1003"),
    ("person1_virus_6_2.jpeg", "person1"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("IM-0429-0001-0002.jpeg", "IM-0429"),
    ("NORMAL2-IM-0429-0001.jpeg", "IM-0429"),
    ("train/NORMAL/NORMAL2-IM-1345-0001-0002.jpeg", "IM-1345"),
])
def test_patient_key(name: str, key: str) -> None:
    assert patient_key(name) == key


def test_patient_key_rejects_unknown_pattern() -> None:
    with pytest.raises(ValueError, match="no patient id"):
        patient_key("scan.jpeg")


def test_split_keeps_patients_whole_and_stratifies() -> None:
    # 40 patients with 1–3 images each; 10 normal (label 0), 30 pneumonia (label 1).
    rng = np.random.default_rng(3)
    patients: list[str] = []
    labels: list[int] = []
    for p in range(40):
        for _ in range(int(rng.integers(1, 4))):
            patients.append(f"p{p}")
            labels.append(0 if p < 10 else 1)
    y = np.array(labels, dtype=np.int64)
    train, val = split_by_patient(patients, y, val_fraction=0.2, seed=0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(patients)))
    train_p = {patients[i] for i in train}
    val_p = {patients[i] for i in val}
    assert not train_p & val_p
    # round(0.2 × 10) = 2 normal and round(0.2 × 30) = 6 pneumonia patients.
    assert sum(1 for p in val_p if int(p[1:]) < 10) == 2
    assert sum(1 for p in val_p if int(p[1:]) >= 10) == 6
    again, _ = split_by_patient(patients, y, val_fraction=0.2, seed=0)
    assert np.array_equal(train, again)
