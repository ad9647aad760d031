"""LIDC-IDRI reader annotations (``LidcReadMessage`` XML) → per-reader outlines → 3D masks.

Each ``readingSession`` is one radiologist. A nodule of 3 mm or more is an
``unblindedReadNodule`` whose ``roi`` elements outline it on one slice each (``imageSOP_UID``,
``imageZposition``, ``inclusion`` and the boundary pixels ``edgeMap/xCoord,yCoord``, x = column,
y = row); smaller nodules are marked by a single point. Outlines include their boundary pixels,
so a polygon fill of the edge map (boundary included) is the reader's region; an
``inclusion`` of FALSE cuts a hole. The usual consensus is the voxels at least two of the
four readers outlined (Armato et al., Med Phys 2011).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

NS = {"l": "http://www.nih.gov"}

BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Outline:
    """One reader's outline of a nodule on one slice."""

    sop_instance_uid: str
    z_position: float
    inclusion: bool
    #: Boundary pixels as (column, row).
    points: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ReaderNodule:
    """A nodule as one reader saw it: outlined (≥ 3 mm) or a single point (< 3 mm)."""

    reader: int
    nodule_id: str
    outlines: tuple[Outline, ...]

    @property
    def outlined(self) -> bool:
        """True for a nodule ≥ 3 mm (an outline with more than one boundary pixel)."""
        return any(len(o.points) > 1 for o in self.outlines)


def _text(element: ET.Element, path: str) -> str:
    found = element.find(path, NS)
    if found is None or found.text is None:
        raise ValueError(f"LIDC XML: missing {path}")
    return found.text.strip()


def read_lidc_xml(path: Path) -> list[ReaderNodule]:
    """All reader nodules (outlined and point-marked) of one LIDC XML file.

    Parameters
    ----------
    path
        A ``LidcReadMessage`` XML file.

    Returns
    -------
    list of ReaderNodule
        In file order; ``reader`` numbers the reading sessions from 0. Non-nodules are left out.
    """
    root = ET.parse(path).getroot()
    nodules: list[ReaderNodule] = []
    for reader, session in enumerate(root.findall("l:readingSession", NS)):
        for nodule in session.findall("l:unblindedReadNodule", NS):
            outlines = []
            for roi in nodule.findall("l:roi", NS):
                points = tuple((int(_text(e, "l:xCoord")), int(_text(e, "l:yCoord")))
                               for e in roi.findall("l:edgeMap", NS))
                outlines.append(Outline(
                    sop_instance_uid=_text(roi, "l:imageSOP_UID"),
                    z_position=float(_text(roi, "l:imageZposition")),
                    inclusion=_text(roi, "l:inclusion").upper() == "TRUE",
                    points=points))
            nodules.append(ReaderNodule(reader, _text(nodule, "l:noduleID"), tuple(outlines)))
    return nodules


def fill_outline(points: Sequence[tuple[int, int]], shape: tuple[int, int]) -> BoolArray:
    """Region of a closed boundary (column, row) on a rows×columns slice, boundary included."""
    canvas = Image.new("1", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    if len(points) > 2:
        draw.polygon(list(points), fill=1, outline=1)
    else:
        for p in points:
            draw.point(p, fill=1)
    filled: BoolArray = np.asarray(canvas, dtype=bool)
    return filled


def reader_mask(nodule: ReaderNodule, slice_index: Mapping[str, int],
                shape: tuple[int, int, int]) -> BoolArray:
    """One reader's 3D region of one nodule on a (z, rows, columns) volume.

    Outlines on slices not in ``slice_index`` (SOP Instance UID → z) are skipped, so a
    fragment of a series gets the part of the nodule it contains.
    """
    mask = np.zeros(shape, dtype=bool)
    for outline in sorted(nodule.outlines, key=lambda o: not o.inclusion):
        z = slice_index.get(outline.sop_instance_uid)
        if z is None:
            continue
        region = fill_outline(outline.points, shape[1:])
        if outline.inclusion:
            mask[z] |= region
        else:
            mask[z] &= ~region
    return mask


def agreement(nodules: Sequence[ReaderNodule], slice_index: Mapping[str, int],
              shape: tuple[int, int, int]) -> npt.NDArray[np.uint8]:
    """Number of readers who outlined each voxel (each reader counted once per voxel)."""
    readers = sorted({n.reader for n in nodules if n.outlined})
    count = np.zeros(shape, dtype=np.uint8)
    for reader in readers:
        union = np.zeros(shape, dtype=bool)
        for n in nodules:
            if n.reader == reader and n.outlined:
                union |= reader_mask(n, slice_index, shape)
        count += union
    return count


def small_marks(nodules: Sequence[ReaderNodule], slice_index: Mapping[str, int]
                ) -> list[tuple[int, int, int]]:
    """(z, row, column) of the point marks of nodules < 3 mm that lie on the given slices."""
    marks = []
    for n in nodules:
        if n.outlined:
            continue
        for o in n.outlines:
            z = slice_index.get(o.sop_instance_uid)
            if z is not None and o.points:
                col, row = o.points[0]
                marks.append((z, row, col))
    return marks


__all__ = ["Outline", "ReaderNodule", "agreement", "fill_outline", "read_lidc_xml",
           "reader_mask", "small_marks"]
