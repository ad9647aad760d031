"""The algorithm as a Contributing Equipment item, the way IHE AI Results (AIR) asks.

AIR Rev 1.1 §6.5.3.1 wants one Contributing Equipment Sequence (0018,A001) item per algorithm
with Purpose of Reference ("Newcode1", 99IHE, "Processing Algorithm"), Manufacturer,
Manufacturer's Model Name, Software Versions and Device UID. highdicom's
:class:`~highdicom.ContributingEquipment` only accepts the DCM purposes of CID 7005 and has no
Device UID argument, so :class:`AlgorithmEquipment` builds on it: highdicom still checks every
string, and the subclass sets the two attributes it lacks. Being a subclass, the item is
accepted wherever highdicom takes ``contributing_equipment``.
"""

from __future__ import annotations

from datetime import datetime

from highdicom import ContributingEquipment
from pydicom.sr.codedict import codes as dcm_codes

from dicom_ai.inference.findings import ModelInfo
from dicom_ai.results.codes import PROCESSING_ALGORITHM


class AlgorithmEquipment(ContributingEquipment):
    """Contributing Equipment item for an AI algorithm (IHE AIR "Processing Algorithm").

    Parameters
    ----------
    model:
        The algorithm: ``manufacturer`` → Manufacturer, ``name`` → Manufacturer's Model Name,
        ``version`` → Software Versions, ``device_uid`` → Device UID.
    institution_name:
        Institution where the algorithm runs; omitted when empty.
    contribution_datetime:
        When the algorithm contributed (the analysis start).
    """

    def __init__(self, model: ModelInfo, *, institution_name: str = "",
                 contribution_datetime: datetime | None = None) -> None:
        # highdicom validates a DCM purpose; the IHE code replaces it right after, once the
        # other attributes have been checked by highdicom.
        super().__init__(
            manufacturer=model.manufacturer,
            purpose_of_reference=dcm_codes.DCM.ProcessingEquipment,
            manufacturer_model_name=model.name,
            software_versions=[model.version],
            institution_name=institution_name or None,
            contribution_datetime=contribution_datetime,
            contribution_description="AI algorithm that produced the results",
        )
        self.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
        self.DeviceUID = model.device_uid
