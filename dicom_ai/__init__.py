"""dicom-ai: an AI plugin for PACS workflows (research use only, not for diagnostic use)."""

__version__ = "0.1.0"

#: Printed on every output object and report: results are research output, never a diagnosis.
DISCLAIMER = "AI generated — not for diagnostic use"

#: Identifies this implementation to DICOM peers (A-ASSOCIATE-AC) and in the File Meta Information
#: of the instances it stores: uuid5(NAMESPACE_URL, "urn:dicom-ai:implementation") as a 2.25 UID
#: (PS3.5 §B.2), fixed across releases.
IMPLEMENTATION_CLASS_UID = "2.25.137293516886959146900897813829160744279"
#: Implementation Version Name (SH, at most 16 characters).
IMPLEMENTATION_VERSION_NAME = f"DICOMAI_{__version__}"
