"""Training, calibration and evaluation of the shipped classification models."""
