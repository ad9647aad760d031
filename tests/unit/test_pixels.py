"""Pixel decoding: raw stored values out, frames first, and a one-line reason for every failure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from dicom_ai.dicom.decoder_process import ISOLATED_PLUGINS
from dicom_ai.dicom.errors import PixelDecodeError
from dicom_ai.dicom.io import read_header
from dicom_ai.dicom.model import Instance
from dicom_ai.dicom.pixels import (
    DECODING_PLUGINS,
    codestream_size,
    decode,
    decode_frame,
    decode_limit,
    decode_pixels,
    transfer_syntax_name,
)
from tests.conftest import MakeDicom

GREY = (np.arange(48, dtype=np.int16).reshape(6, 8) - 20) * 37
#: Big enough for the default five JPEG 2000 decomposition levels.
RAMP = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 7) % 4096


def _instance(path: Path) -> Instance:
    return Instance(path, read_header(path))


def _compressed(path: Path, syntax: str) -> Path:
    ds = pydicom.dcmread(path)
    ds.compress(syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_native_signed_16_bit(make_dicom: MakeDicom) -> None:
    out = decode(_instance(make_dicom("a.dcm", GREY)))
    assert out.dtype == np.int16
    assert np.array_equal(out, GREY)


def test_multi_frame_is_frames_first(make_dicom: MakeDicom) -> None:
    frames = np.stack([GREY, GREY + 1, GREY + 2])
    instance = _instance(make_dicom("a.dcm", frames, NumberOfFrames=3))
    assert decode(instance).shape == (3, 6, 8)
    assert np.array_equal(decode_frame(instance, 2), GREY + 2)
    with pytest.raises(PixelDecodeError, match="frame 3 requested of an image with 3 frame"):
        decode_frame(instance, 3)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_lossless_codecs_round_trip(make_dicom: MakeDicom, syntax: str) -> None:
    path = _compressed(make_dicom("a.dcm", RAMP), syntax)
    assert np.array_equal(decode(_instance(path)), RAMP)


def test_ybr_full_stays_ybr(make_dicom: MakeDicom) -> None:
    ybr = np.zeros((2, 2, 3), dtype=np.uint8)
    ybr[..., 0], ybr[..., 1], ybr[..., 2] = 76, 85, 255  # a saturated red in YCbCr
    path = make_dicom("a.dcm", ybr, PhotometricInterpretation="YBR_FULL")
    decoded = decode_pixels(_instance(path))
    assert decoded.photometric_interpretation == "YBR_FULL"
    assert np.array_equal(decoded.array, ybr)


def test_jpeg2000_colour_transform_is_reported_as_rgb(make_dicom: MakeDicom) -> None:
    rgb = np.zeros((64, 64, 3), dtype=np.uint8)
    rgb[..., 0] = (RAMP % 256).astype(np.uint8)
    rgb[..., 2] = 200
    path = make_dicom("a.dcm", rgb)
    ds = pydicom.dcmread(path)
    # Labelling RGB samples YBR_RCT is how pydicom is told to apply the colour transform.
    ds.PhotometricInterpretation = "YBR_RCT"
    ds.compress(JPEG2000Lossless, use_mct=True)
    ds.save_as(path, enforce_file_format=True)
    decoded = decode_pixels(_instance(path))
    assert decoded.photometric_interpretation == "RGB"
    assert np.array_equal(decoded.array, rgb)


def test_short_pixel_data(make_dicom: MakeDicom) -> None:
    path = make_dicom("a.dcm", GREY)
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:-2]
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(PixelDecodeError) as info:
        decode(_instance(path))
    assert info.value.reason == "pixel data shorter than expected: 94 of 96 bytes"


def test_truncated_file_keeps_the_read_reason(make_dicom: MakeDicom) -> None:
    path = make_dicom("a.dcm", GREY)
    instance = _instance(path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(PixelDecodeError, match=r"truncated: \(7FE0,0010\) holds 86 of 96 bytes"):
        decode(instance)


def test_missing_bits_allocated(make_dicom: MakeDicom) -> None:
    path = make_dicom("a.dcm", GREY)
    ds = pydicom.dcmread(path)
    del ds.BitsAllocated
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(PixelDecodeError) as info:
        decode(_instance(path))
    assert info.value.reason == "missing Bits Allocated (0028,0100)"


def test_no_pixel_data(make_dicom: MakeDicom) -> None:
    with pytest.raises(PixelDecodeError) as info:
        decode(_instance(make_dicom("sr.dcm", None)))
    assert info.value.reason == "no pixel data"


def test_unsupported_transfer_syntax_is_named(make_dicom: MakeDicom) -> None:
    # pydicom will not write a transfer syntax it does not know: write JPEG 2000 Lossless
    # (a UID of the same length) and patch the file meta.
    path = _compressed(make_dicom("a.dcm", RAMP), JPEG2000Lossless)
    data = path.read_bytes()
    assert data.count(b"1.2.840.10008.1.2.4.90") == 1
    path.write_bytes(data.replace(b"1.2.840.10008.1.2.4.90", b"1.2.840.10008.1.2.8.1\0"))
    with pytest.raises(PixelDecodeError) as info:
        decode(_instance(path))
    assert info.value.reason == "Deflated Image Frame Compression is not supported"


def test_no_file_meta_uses_the_encoding_read(make_dicom: MakeDicom, tmp_path: Path) -> None:
    ds = pydicom.dcmread(make_dicom("a.dcm", GREY))
    del ds.file_meta
    ds.preamble = None
    bare = tmp_path / "bare"
    ds.save_as(bare, implicit_vr=False, little_endian=True)
    assert np.array_equal(decode(_instance(bare)), GREY)


def test_corrupt_codestream(make_dicom: MakeDicom) -> None:
    path = _compressed(make_dicom("a.dcm", RAMP), JPEGLSLossless)
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(30)])
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(PixelDecodeError) as info:
        decode(_instance(path))
    assert info.value.reason.startswith("cannot decode JPEG-LS Lossless Image Compression: ")
    assert "\n" not in info.value.reason


def test_transfer_syntax_name() -> None:
    assert transfer_syntax_name("1.2.840.10008.1.2.4.51") == "JPEG Extended (Process 2 and 4)"
    assert transfer_syntax_name("1.2.840.10008.1.2.8.1") == "Deflated Image Frame Compression"


def test_no_plugin_installed(make_dicom: MakeDicom, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _compressed(make_dicom("a.dcm", RAMP), JPEGLSLossless)
    decoder = get_decoder(JPEGLSLossless)
    monkeypatch.setattr(type(decoder), "available_plugins", property(lambda self: ()))
    with pytest.raises(PixelDecodeError) as info:
        decode(_instance(path))
    assert info.value.reason == ("no decoder plugin available for JPEG-LS Lossless Image "
                                 "Compression")


def _declaring(path: Path, **attrs: int) -> Instance:
    ds = pydicom.dcmread(path)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return _instance(path)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless])
def test_a_small_file_declaring_a_huge_image_is_refused_before_decoding(
        make_dicom: MakeDicom, monkeypatch: pytest.MonkeyPatch, syntax: str) -> None:
    path = _compressed(make_dicom("a.dcm", RAMP), syntax)
    instance = _declaring(path, Rows=65000, Columns=65000)
    assert path.stat().st_size < 20_000

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("the decoder was reached")

    monkeypatch.setattr("dicom_ai.dicom.pixels.read_dataset", no_decoding)
    with pytest.raises(PixelDecodeError) as info:
        decode(instance)
    assert info.value.reason == ("declared image size 65000 x 65000 x 1 frame(s) x 1 sample(s) "
                                 "x 16 bit(s) (8059 MiB) exceeds limits.max_decoded_mb "
                                 "(1024 MiB)")


def test_frames_count_towards_the_limit_unless_one_is_asked_for(make_dicom: MakeDicom) -> None:
    frame = np.zeros((512, 512), dtype=np.uint16)  # 0.5 MiB
    instance = _instance(make_dicom("a.dcm", np.stack([frame] * 4), NumberOfFrames=4))
    with decode_limit(1):
        with pytest.raises(PixelDecodeError, match=r"x 4 frame\(s\) .* \(2 MiB\) exceeds"):
            decode(instance)
        assert decode_frame(instance, 3).shape == frame.shape


def test_decode_limit_is_the_setting_in_force(make_dicom: MakeDicom) -> None:
    instance = _instance(make_dicom("a.dcm", RAMP))  # 8 KiB decoded
    assert decode(instance).shape == RAMP.shape
    with decode_limit(1):
        assert decode(instance).shape == RAMP.shape
    big = _instance(make_dicom("b.dcm", np.zeros((1024, 1024), dtype=np.uint16)))  # 2 MiB
    with decode_limit(1), pytest.raises(PixelDecodeError, match=r"\(2 MiB\) exceeds"):
        decode(big)
    assert decode(big).shape == (1024, 1024)


def _patch_codestream(path: Path, old: bytes, new: bytes) -> Instance:
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))
    return _instance(path)


def test_a_codestream_larger_than_the_header_is_refused(make_dicom: MakeDicom) -> None:
    # The header says 64 x 64; the JPEG 2000 SIZ segment is made to say 65000 x 65000.
    path = _compressed(make_dicom("a.dcm", RAMP), JPEG2000Lossless)
    siz = b"\xff\x51" + pydicom.dcmread(path).PixelData.split(b"\xff\x51", 1)[1][:10]
    assert codestream_size(b"\xff\x4f" + siz + bytes(40)) is not None
    huge = siz[:6] + (65000).to_bytes(4, "big") + (65000).to_bytes(4, "big")
    instance = _patch_codestream(path, siz, huge[:len(siz)])
    with pytest.raises(PixelDecodeError, match=r"codestream declares 65000 x \d+ x 1 samples"):
        decode(instance)


def test_codestream_size_of_jpeg_ls_and_fragments_that_start_none(make_dicom: MakeDicom) -> None:
    path = _compressed(make_dicom("a.dcm", RAMP), JPEGLSLossless)
    _offset_table, fragment = generate_fragments(pydicom.dcmread(path).PixelData)
    assert codestream_size(fragment) == (64, 64, 1)
    assert codestream_size(b"\x12\x34" + fragment) is None
    assert codestream_size(fragment[:8]) is None


@pytest.mark.timeout(60)
def test_a_jp2_box_of_length_zero_is_refused_before_pydicom_loops_on_it(
        make_dicom: MakeDicom) -> None:
    # JP2 signature box, then a box that declares length 0 before any codestream box:
    # pydicom's get_j2k_parameters adds 0 to its offset for ever.
    path = _compressed(make_dicom("a.dcm", RAMP), JPEG2000Lossless)
    ds = pydicom.dcmread(path)
    _offset_table, codestream = generate_fragments(ds.PixelData)
    ds.PixelData = encapsulate([b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(4) + b"jp2h"
                                + codestream])
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(PixelDecodeError) as info:
        decode(_instance(path))
    assert info.value.reason == "a JP2 file whose boxes do not lead to its codestream (jp2c)"


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEG2000Lossless])
def test_a_syntax_with_a_named_plugin_is_decoded_by_that_plugin_alone(
        make_dicom: MakeDicom, monkeypatch: pytest.MonkeyPatch, syntax: str) -> None:
    path = _compressed(make_dicom("a.dcm", RAMP), syntax)
    decoder = get_decoder(syntax)
    asked: list[object] = []
    real = type(decoder).as_array

    def spy(self: object, *args: object, **kwargs: object) -> object:
        asked.append(kwargs.get("decoding_plugin"))
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(type(decoder), "as_array", spy)
    np.testing.assert_array_equal(decode(_instance(path)), RAMP)
    assert asked == list(DECODING_PLUGINS[syntax]) and "gdcm" not in asked
    monkeypatch.setattr(type(decoder), "available_plugins",
                        property(lambda self: ("gdcm",)))
    with pytest.raises(PixelDecodeError) as info:
        decode(_instance(path))
    assert info.value.reason.startswith(f"no {DECODING_PLUGINS[syntax][0]} decoder installed for ")


@pytest.mark.parametrize("error", [ValueError("could not convert 'Doe^Jane'"), MemoryError(),
                                   KeyError("PatientName"), OverflowError("too big")])
@pytest.mark.parametrize("step", ["get_decoder", "get_expected_length", "as_pixel_options"])
def test_any_decoder_exception_is_the_files_reason(make_dicom: MakeDicom,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   error: Exception, step: str) -> None:
    instance = _instance(make_dicom("a.dcm", GREY))

    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(f"dicom_ai.dicom.pixels.{step}", fail)
    with pytest.raises(PixelDecodeError) as info:
        decode(instance)
    assert info.value.reason.startswith("cannot decode")
    assert "Doe" not in info.value.reason and "\n" not in info.value.reason


def test_every_compressed_syntax_the_listener_accepts_names_its_plugin() -> None:
    # Left to pydicom's order, a syntax could reach GDCM in this process, which an abort ends.
    from dicom_ai.service.scp import TRANSFER_SYNTAXES

    compressed = {ts for ts in TRANSFER_SYNTAXES if not get_decoder(ts).is_native}
    assert compressed <= set(DECODING_PLUGINS)
    assert {ts for ts, plugins in DECODING_PLUGINS.items() if "gdcm" in plugins} == {
        JPEGLossless, JPEGLosslessSV1}
    assert {"gdcm"} == ISOLATED_PLUGINS
