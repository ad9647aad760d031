"""LIDC XML parsing and rasterization on a small hand-written reading message."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dicom_ai.train.lidc import (
    ReaderNodule,
    agreement,
    fill_outline,
    read_lidc_xml,
    reader_mask,
    small_marks,
)

XML = """<?xml version="1.0" encoding="UTF-8"?>
<LidcReadMessage xmlns="http://www.nih.gov">
<readingSession>
  <unblindedReadNodule><noduleID>A</noduleID>
    <roi><imageZposition>-10.0</imageZposition><imageSOP_UID>1.2.1</imageSOP_UID>
      <inclusion>TRUE</inclusion>
      <edgeMap><xCoord>2</xCoord><yCoord>2</yCoord></edgeMap>
      <edgeMap><xCoord>6</xCoord><yCoord>2</yCoord></edgeMap>
      <edgeMap><xCoord>6</xCoord><yCoord>5</yCoord></edgeMap>
      <edgeMap><xCoord>2</xCoord><yCoord>5</yCoord></edgeMap>
    </roi>
    <roi><imageZposition>-10.0</imageZposition><imageSOP_UID>1.2.1</imageSOP_UID>
      <inclusion>FALSE</inclusion>
      <edgeMap><xCoord>4</xCoord><yCoord>3</yCoord></edgeMap>
    </roi>
    <roi><imageZposition>-12.5</imageZposition><imageSOP_UID>1.2.9</imageSOP_UID>
      <inclusion>TRUE</inclusion>
      <edgeMap><xCoord>1</xCoord><yCoord>1</yCoord></edgeMap>
      <edgeMap><xCoord>3</xCoord><yCoord>1</yCoord></edgeMap>
      <edgeMap><xCoord>3</xCoord><yCoord>3</yCoord></edgeMap>
    </roi>
  </unblindedReadNodule>
  <unblindedReadNodule><noduleID>small</noduleID>
    <roi><imageZposition>-7.5</imageZposition><imageSOP_UID>1.2.2</imageSOP_UID>
      <inclusion>TRUE</inclusion><edgeMap><xCoord>8</xCoord><yCoord>1</yCoord></edgeMap>
    </roi>
  </unblindedReadNodule>
  <nonNodule><nonNoduleID>x</nonNoduleID></nonNodule>
</readingSession>
<readingSession>
  <unblindedReadNodule><noduleID>B</noduleID>
    <roi><imageZposition>-10.0</imageZposition><imageSOP_UID>1.2.1</imageSOP_UID>
      <inclusion>TRUE</inclusion>
      <edgeMap><xCoord>5</xCoord><yCoord>2</yCoord></edgeMap>
      <edgeMap><xCoord>7</xCoord><yCoord>2</yCoord></edgeMap>
      <edgeMap><xCoord>7</xCoord><yCoord>4</yCoord></edgeMap>
      <edgeMap><xCoord>5</xCoord><yCoord>4</yCoord></edgeMap>
    </roi>
  </unblindedReadNodule>
</readingSession>
</LidcReadMessage>
"""

SLICES = {"1.2.1": 0, "1.2.2": 1}
SHAPE = (2, 8, 10)


def _nodules(tmp_path: Path) -> list[ReaderNodule]:
    path = tmp_path / "read.xml"
    path.write_text(XML, encoding="utf-8")
    return read_lidc_xml(path)


def test_parse_sessions_nodules_and_outlines(tmp_path: Path) -> None:
    nodules = _nodules(tmp_path)
    assert [(n.reader, n.nodule_id, n.outlined) for n in nodules] == [
        (0, "A", True), (0, "small", False), (1, "B", True)]
    first = nodules[0].outlines[0]
    assert first.sop_instance_uid == "1.2.1" and first.z_position == -10.0 and first.inclusion
    assert first.points == ((2, 2), (6, 2), (6, 5), (2, 5))
    assert not nodules[0].outlines[1].inclusion


def test_fill_outline_includes_the_boundary() -> None:
    region = fill_outline([(2, 2), (6, 2), (6, 5), (2, 5)], (8, 10))
    expected = np.zeros((8, 10), dtype=bool)
    expected[2:6, 2:7] = True  # rows 2–5, columns 2–6
    assert np.array_equal(region, expected)


def test_reader_mask_cuts_exclusions_and_skips_absent_slices(tmp_path: Path) -> None:
    a = _nodules(tmp_path)[0]
    mask = reader_mask(a, SLICES, SHAPE)
    expected = np.zeros(SHAPE, dtype=bool)
    expected[0, 2:6, 2:7] = True
    expected[0, 3, 4] = False  # the one-pixel exclusion
    assert np.array_equal(mask, expected)  # the outline on 1.2.9 is not in this fragment


def test_agreement_counts_readers_and_small_marks(tmp_path: Path) -> None:
    nodules = _nodules(tmp_path)
    count = agreement(nodules, SLICES, SHAPE)
    assert count.max() == 2
    both = np.zeros(SHAPE, dtype=bool)
    both[0, 2:5, 5:7] = True  # reader A rows 2–5 cols 2–6 ∩ reader B rows 2–4 cols 5–7
    assert np.array_equal(count == 2, both)
    assert count[0, 2, 7] == 1 and count[0, 5, 2] == 1
    assert small_marks(nodules, SLICES) == [(1, 1, 8)]
