"""Per-modality normalization: pure functions from decoded pixels + metadata to model input.

Training reads its JPEG/NumPy sources through these same functions, so a DICOM at inference
time gives the network the numbers it was trained on.
"""
