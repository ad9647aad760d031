"""``limits.max_volume_mb``: a CT series is refused by its declared volume size before a slice is
decoded (each image alone is bounded by ``limits.max_decoded_mb``, a stack of them is not)."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.uid import CTImageStorage

from dicom_ai import pipeline
from dicom_ai.config import Settings, validate
from dicom_ai.dicom.collect import collect
from dicom_ai.dicom.errors import PixelDecodeError
from dicom_ai.dicom.model import Series
from dicom_ai.dicom.pixels import decode_limit
from dicom_ai.imaging import ct
from tests.conftest import MakeDicom

#: Three 512 x 512 slices: a float32 volume of exactly 3 MiB.
SLICES, SIDE = 3, 512


def series_of_three(make_dicom: MakeDicom) -> Series:
    paths = [make_dicom(f"ct/{k}.dcm", np.full((SIDE, SIDE), k, dtype=np.int16),
                        SOPClassUID=CTImageStorage, Modality="CT",
                        ImagePositionPatient=[0.0, 0.0, float(k)],
                        ImageOrientationPatient=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
                        PixelSpacing=[0.7, 0.7])
             for k in range(SLICES)]
    (study,) = collect(paths).studies
    return study.series[0]


def test_volume_over_the_limit_is_refused_before_any_slice_is_decoded(
        make_dicom: MakeDicom, monkeypatch: pytest.MonkeyPatch) -> None:
    series = series_of_three(make_dicom)

    def no_decode(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a slice was decoded")

    with monkeypatch.context() as patched:
        patched.setattr(ct, "decode", no_decode)
        with decode_limit(1024, max_volume_mb=2), pytest.raises(PixelDecodeError) as refused:
            ct.build_volume(series)
    assert refused.value.reason == (
        "declared volume 3 slices x 512 x 512 x 4 byte(s) (3 MiB) exceeds "
        "limits.max_volume_mb (2 MiB)")
    # At the limit it is built; outside the block the default (2048 MiB) applies again.
    with decode_limit(1024, max_volume_mb=3):
        assert ct.build_volume(series).hu.shape == (SLICES, SIDE, SIDE)
    assert ct.build_volume(series).hu.shape == (SLICES, SIDE, SIDE)


def test_max_volume_mb_must_be_positive() -> None:
    settings = Settings()
    settings.limits.max_volume_mb = 0
    assert "limits.max_volume_mb: must be at least 1" in validate(settings)


def test_the_pipeline_applies_the_configured_volume_limit(
        make_dicom: MakeDicom, monkeypatch: pytest.MonkeyPatch) -> None:
    """``run_study`` analyses every series under the settings' limits, not the defaults."""
    series = series_of_three(make_dicom)
    refusals: list[str] = []

    def build(series: Series, *_args: object) -> None:
        try:
            ct.build_volume(series)
        except PixelDecodeError as exc:
            refusals.append(exc.reason)

    monkeypatch.setattr(pipeline, "analyse_series", build)
    settings = Settings()
    settings.limits.max_volume_mb = 2
    (study,) = collect([instance.path for instance in series.instances]).studies
    pipeline.run_study(study, [], settings)
    assert refusals == [
        "declared volume 3 slices x 512 x 512 x 4 byte(s) (3 MiB) exceeds "
        "limits.max_volume_mb (2 MiB)"]
