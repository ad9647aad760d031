"""Reading DICOM: safe read, discovery, grouping into studies and series, pixel decoding."""
