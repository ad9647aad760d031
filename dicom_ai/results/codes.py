"""Every coded concept our SR and SC use, in one table (documented in ``docs/sr-template.md``).

Bundles name their finding types and finding site as ``{"value", "scheme", "meaning"}``
(:data:`CodeSpec`); quantitative findings whose label has no code in the bundle fall back to
:data:`DEFAULT_QUANTITY_CODES`. Codes were checked against pydicom's DICOM code dictionary
(``pydicom.sr.codedict``) where it has them; the LOINC procedure codes and the IHE code are cited
in the template document.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset

#: The bundle form of a code: ``{"value": ..., "scheme": ..., "meaning": ...}``.
CodeSpec = Mapping[str, str]

#: Designator of our private coding scheme (PS3.16 8.2: private schemes start with "99").
PRIVATE_SCHEME = "99DICOMAI"
#: Names of the private schemes we use, for the Coding Scheme Identification Sequence.
PRIVATE_SCHEME_NAMES = {
    "99IHE": "IHE Radiology Technical Framework codes",
    PRIVATE_SCHEME: "dicom-ai private codes (docs/sr-template.md)",
}


#: "More than one fracture on the image" (xr-fracture reports it when it draws more than one
#: box). No SNOMED CT concept for it could be verified from the sources at hand: one table
#: gives 373062004 "Multiple fractures (disorder)", but three independent sources use that
#: identifier for "Device used (finding)". So it is a private code of this scheme, with a
#: meaning a reader understands, until a verified SNOMED CT code replaces it.
MULTIPLE_FRACTURES: dict[str, str] = {"value": "MULTFX", "scheme": PRIVATE_SCHEME,
                                      "meaning": "Multiple fractures"}


#: Body Part Examined → (FracAtlas region, SNOMED CT code, meaning) of every limb and joint
#: xr-fracture reads; its bundle accepts exactly these values. The values are the PS3.16
#: Annex L defined terms (``UPPERARM``, ``LOWERLEG``, ``ACJOINT`` …) and the spelled-out or
#: retired forms devices still send (``UPPER ARM``, ``LEG``, ``ARM``); every code and meaning
#: is one pydicom's code dictionary has (most from CID 4031 "Common Anatomic Regions").
FRACTURE_SITES: dict[str, tuple[str, str, str]] = {
    "HAND": ("hand", "85562004", "Hand"),
    "FINGER": ("hand", "7569003", "Finger"),
    "THUMB": ("hand", "76505004", "Thumb"),
    "WRIST": ("hand", "74670003", "Wrist joint"),
    "FOREARM": ("hand", "14975008", "Forearm"),
    "RADIUS": ("hand", "62413002", "Radius"),
    "ULNA": ("hand", "23416004", "Ulna"),
    "RADIUSULNA": ("hand", "110535000", "Radius and ulna"),
    "ELBOW": ("shoulder", "16953009", "Elbow joint"),
    "HUMERUS": ("shoulder", "85050009", "Humerus"),
    "UPPERARM": ("shoulder", "40983000", "Upper arm"),
    "UPPER ARM": ("shoulder", "40983000", "Upper arm"),
    "UPPERLIMB": ("shoulder", "53120007", "Upper limb"),
    "ARM": ("shoulder", "53120007", "Upper limb"),
    "UPPER EXTREMITY": ("shoulder", "53120007", "Upper limb"),
    "SHOULDER": ("shoulder", "16982005", "Shoulder"),
    "ACJOINT": ("shoulder", "85856004", "Acromioclavicular joint"),
    "SCJOINT": ("shoulder", "7844006", "Sternoclavicular joint"),
    "CLAVICLE": ("shoulder", "51299004", "Clavicle"),
    "SCAPULA": ("shoulder", "79601000", "Scapula"),
    "HIP": ("hip", "29836001", "Hip"),
    "PELVIS": ("hip", "816092008", "Pelvis"),
    "PELVISLOWEXTREMT": ("hip", "1231522001", "Pelvis and lower extremities"),
    "FEMUR": ("leg", "71341001", "Femur"),
    "THIGH": ("leg", "68367000", "Thigh"),
    "KNEE": ("leg", "72696002", "Knee"),
    "PATELLA": ("leg", "64234005", "Patella"),
    "LOWERLIMB": ("leg", "61685007", "Lower limb"),
    "LEG": ("leg", "61685007", "Lower limb"),
    "LOWER EXTREMITY": ("leg", "61685007", "Lower limb"),
    "LOWERLEG": ("leg", "30021000", "Lower leg"),
    "LOWER LEG": ("leg", "30021000", "Lower leg"),
    "CALF": ("leg", "53840002", "Calf of leg"),
    "TIBIA": ("leg", "12611008", "Tibia"),
    "FIBULA": ("leg", "87342007", "Fibula"),
    "TIBIAFIBULA": ("leg", "110536004", "Tibia and fibula"),
    "ANKLE": ("leg", "70258002", "Ankle joint"),
    "FOOT": ("leg", "56459004", "Foot"),
    "TOE": ("leg", "29707007", "Toe"),
    "SESAMOID": ("leg", "58742003", "Sesamoid bones of foot"),
    "HEEL": ("leg", "80144004", "Calcaneus"),
    "CALCANEUS": ("leg", "80144004", "Calcaneus"),
    "EXTREMITY": ("", "66019005", "Extremity"),
}


def concept(spec: CodeSpec) -> CodedConcept:
    """A bundle ``CodeSpec`` as a highdicom coded concept.

    Raises
    ------
    ValueError
        When a key is missing or empty.
    """
    missing = [k for k in ("value", "scheme", "meaning") if not spec.get(k)]
    if missing:
        raise ValueError(f"code {dict(spec)!r} lacks {', '.join(missing)}")
    return CodedConcept(value=str(spec["value"]), scheme_designator=str(spec["scheme"]),
                        meaning=str(spec["meaning"]))


def private_code(label: str) -> CodedConcept:
    """``(label, 99DICOMAI, label)`` for a label the bundle gave no code: the finding is still
    reported, under a name nobody can mistake for a standard concept. Labels longer than 16
    characters go to Long Code Value (highdicom picks it)."""
    return CodedConcept(value=label, scheme_designator=PRIVATE_SCHEME, meaning=label)


def finding_concept(label: str, codes: Mapping[str, CodeSpec]) -> CodedConcept:
    """The bundle's code for ``label``, or a private code naming the label when it has none."""
    return concept(codes[label]) if label in codes else private_code(label)


def _c(value: str, scheme: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


# --- measurement group content -------------------------------------------------------------
PROBABILITY = _c("122157", "DCM", "Probability")
PRESENT = _c("52101004", "SCT", "Present")
ABSENT = _c("272519000", "SCT", "Absent")
LONG_AXIS = _c("103339001", "SCT", "Long axis")
ANALYSIS_PERFORMED = _c("111004", "DCM", "Analysis Performed")
NOT_PERFORMED = _c("262008008", "SCT", "Not performed")
COMMENT = _c("121106", "DCM", "Comment")
ANATOMICAL_STRUCTURE = _c("91723000", "SCT", "Anatomical Structure")
BEST_ILLUSTRATION = _c("121080", "DCM", "Best illustration of finding")
#: TID 1500 row 12: the report-level container for free-text and coded evaluations.
QUALITATIVE_EVALUATIONS = _c("C0034375", "UMLS", "Qualitative Evaluations")
IMPRESSION = _c("121073", "DCM", "Impression")
#: CID 42 Numeric Value Qualifiers: a NUM whose value could not be given says why.
NOT_A_NUMBER = _c("114000", "DCM", "Not a number")
MEASUREMENT_NOT_ATTEMPTED = _c("114007", "DCM", "Measurement not attempted")

# --- language of content (TID 1204; RFC 5646 tags) -----------------------------------------
LANGUAGE_CODES = {
    "en": _c("en-US", "RFC5646", "English (United States)"),
    "zh": _c("zh-CN", "RFC5646", "Chinese (China)"),
}

# --- contributing equipment -----------------------------------------------------------------
#: IHE Radiology AI Results (AIR) Rev 1.1, 6.5.3.1: Purpose of Reference of the algorithm's
#: Contributing Equipment item. IHE published it under a placeholder value that DICOM has not
#: replaced; viewers that implement AIR match on exactly this triplet.
PROCESSING_ALGORITHM = _c("Newcode1", "99IHE", "Processing Algorithm")

# --- units (UCUM) --------------------------------------------------------------------------
_UCUM_MEANINGS = {
    "1": "no units",
    "%": "Percent",
    "mm": "millimeter",
    "mm2": "square millimeter",
    "mm3": "cubic millimeter",
    "mL": "milliliter",
    "ml": "milliliter",
    "[hnsf'U]": "Hounsfield unit",
}


def ucum(unit: str) -> CodedConcept:
    """A UCUM unit code; the meaning comes from a small table, else the unit string itself."""
    code = "mL" if unit == "ml" else unit
    return _c(code, "UCUM", _UCUM_MEANINGS.get(unit, unit))


NO_UNITS = ucum("1")
MILLIMETER = ucum("mm")

# --- anatomy ----------------------------------------------------------------------------------
LUNG = _c("39607008", "SCT", "Lung")
LEFT_LUNG = _c("44029006", "SCT", "Left lung")
RIGHT_LUNG = _c("3341006", "SCT", "Right lung")
BOTH_LUNGS = _c("74101002", "SCT", "Both lungs")


@dataclass(frozen=True)
class QuantityCode:
    """How a quantitative finding is coded: the measured concept and where it was measured."""

    name: CodedConcept
    site: CodedConcept | None = None


VOLUME = _c("118565006", "SCT", "Volume")
MEAN_ATTENUATION = _c("112181", "DCM", "Mean Attenuation Coefficient")
#: No standard code exists for the relative area of lung below a HU threshold (emphysema
#: index); a private code says exactly what was computed.
LOW_ATTENUATION_PERCENT = _c("LAA950", PRIVATE_SCHEME,
                             "Percent of lung volume below -950 HU")

#: Fallback codes for the quantitative labels of the lung CT model (bundle codes win).
DEFAULT_QUANTITY_CODES: dict[str, QuantityCode] = {
    "lung_volume_left_ml": QuantityCode(VOLUME, LEFT_LUNG),
    "lung_volume_right_ml": QuantityCode(VOLUME, RIGHT_LUNG),
    "lung_volume_ml": QuantityCode(VOLUME, BOTH_LUNGS),
    "lung_volume_total_ml": QuantityCode(VOLUME, BOTH_LUNGS),
    "mean_lung_density_hu": QuantityCode(MEAN_ATTENUATION, BOTH_LUNGS),
    "laa950_percent": QuantityCode(LOW_ATTENUATION_PERCENT, BOTH_LUNGS),
}

# --- procedure reported ----------------------------------------------------------------------
#: CID 100 "Quantitative Diagnostic Imaging Procedures", the context group of TID 1500
#: "Procedure reported". Body-region codes such as LOINC 24627-2 "CT Chest" would say more, but
#: CID 100 lists none for CT chest or any radiograph, and PixelMed's SR validator reports a code
#: outside the group as an error; the body region is in the finding sites instead.
CT_UNSPECIFIED = _c("25045-6", "LN", "CT unspecified body region")
MR_UNSPECIFIED = _c("25056-3", "LN", "MRI unspecified body region")
IMAGING_PROCEDURE = _c("363679005", "SCT", "Imaging procedure")


def procedure_reported(header: Dataset) -> CodedConcept:
    """The imaging procedure that was analysed, for TID 1500 "Procedure reported".

    The source's own Procedure Code Sequence wins (the site's code for what was done).
    Otherwise the CID 100 code of the modality: CT and MR have one, anything else (radiographs,
    photographs) is SCT "Imaging procedure".
    """
    seq = header.get("ProcedureCodeSequence")
    if seq:
        item = seq[0]
        if item.get("CodeValue") and item.get("CodingSchemeDesignator") and item.get(
                "CodeMeaning"):
            return _c(str(item.CodeValue), str(item.CodingSchemeDesignator),
                      str(item.CodeMeaning))
    modality = str(header.get("Modality", "")).upper()
    return {"CT": CT_UNSPECIFIED, "MR": MR_UNSPECIFIED}.get(modality, IMAGING_PROCEDURE)


def coding_schemes(datasets: Sequence[Dataset]) -> list[CodingSchemeIdentificationItem]:
    """Coding Scheme Identification items for every private ("99…") scheme used anywhere in
    ``datasets`` (recursively), so that a reader can tell what the designator means."""
    found: set[str] = set()

    def walk(ds: Dataset) -> None:
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            elif elem.keyword == "CodingSchemeDesignator" and str(elem.value).startswith("99"):
                found.add(str(elem.value))

    for ds in datasets:
        walk(ds)
    return [CodingSchemeIdentificationItem(designator=d, name=PRIVATE_SCHEME_NAMES.get(d))
            for d in sorted(found)]
