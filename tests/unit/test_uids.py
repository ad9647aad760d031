"""Deterministic output UIDs: same inputs → same UID; anything that matters changes it."""

from __future__ import annotations

import pytest
from pydicom.uid import UID

from dicom_ai.inference.findings import ModelInfo
from dicom_ai.results import build_outputs
from dicom_ai.results.uids import derive_uid
from tests import results_fixtures as fx

MODEL = ModelInfo(name="cxr-pneumonia", version="1.0.0", device_uid="2.25.42")
SOURCES = ["1.2.3.4.5", "1.2.3.4.6", "1.2.3.4.7"]


def test_same_inputs_same_uid_in_any_order() -> None:
    first = derive_uid(SOURCES, MODEL, "sr")
    assert derive_uid(list(reversed(SOURCES)), MODEL, "sr") == first
    assert derive_uid([*SOURCES, SOURCES[0]], MODEL, "sr") == first


@pytest.mark.parametrize("other", [
    ModelInfo(name="cxr-pneumonia", version="1.0.1", device_uid="2.25.42"),
    ModelInfo(name="cxr-other", version="1.0.0", device_uid="2.25.42"),
    ModelInfo(name="cxr-pneumonia", version="1.0.0", device_uid="2.25.43"),
])
def test_model_identity_changes_uid(other: ModelInfo) -> None:
    assert derive_uid(SOURCES, other, "sr") != derive_uid(SOURCES, MODEL, "sr")


def test_kind_and_sources_change_uid() -> None:
    base = derive_uid(SOURCES, MODEL, "sr")
    assert derive_uid(SOURCES, MODEL, "sr-series") != base
    assert derive_uid(SOURCES[:2], MODEL, "sr") != base


def test_empty_root_is_a_uuid_derived_uid() -> None:
    uid = derive_uid(SOURCES, MODEL, "sr")
    assert uid.startswith("2.25.")
    assert UID(uid).is_valid
    assert len(uid) <= 64


def test_organization_root_prefixes_a_valid_64_char_uid() -> None:
    root = "1.2.826.0.1.3680043.10.5"
    uid = derive_uid(SOURCES, MODEL, "sr", root=root)
    assert uid.startswith(root + ".")
    assert UID(uid).is_valid
    assert len(uid) <= 64
    assert uid == derive_uid(SOURCES, MODEL, "sr", root=root)


@pytest.mark.parametrize("root", ["1.2.abc", "1..2", "1.02.3"])
def test_invalid_root_is_refused(root: str) -> None:
    with pytest.raises(ValueError, match="UID root"):
        derive_uid(SOURCES, MODEL, "sr", root=root)


def test_replaying_a_study_twice_gives_identical_uids() -> None:
    def uids() -> list[tuple[str, str]]:
        datasets = build_outputs([fx.dx_result()], fx.settings(), codes=fx.CODES,
                                 finding_site=fx.LUNG)
        return [(str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)) for ds in datasets]

    first = uids()
    assert first == uids()
    assert len({sop for sop, _ in first}) == len(first)
