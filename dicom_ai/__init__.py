"""dicom-ai: an AI plugin for PACS workflows (research use only, not for diagnostic use)."""

__version__ = "0.1.0"

#: Printed on every output object and report: results are research output, never a diagnosis.
DISCLAIMER = "AI generated — not for diagnostic use"
