"""Input-fit scores of DICOM files against a bundle, whatever its routing would say.

Each file is prepared for the bundle as ``serve`` and ``replay`` prepare it
(:func:`dicom_ai.inference.classify.prepare_series`) and scored as the input-fit check scores it
(:func:`dicom_ai.inference.input_fit.scored`): the Mahalanobis distance to the training images'
features, against the bundle's threshold. Routing (body part, modality) is bypassed on purpose,
to show what the check alone would decide, e.g. for a chest film sent to the fracture model.

Usage::

    python scripts/experiments/input_fit_scores.py models/xr-fracture sample_studies/*/1.dcm
"""

from __future__ import annotations

import argparse
import functools
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import torch

from dicom_ai.dicom.model import Instance, Series
from dicom_ai.inference import input_fit
from dicom_ai.inference.bundle import load_bundle
from dicom_ai.inference.classify import prepare_series


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    bundle = load_bundle(args.bundle, device=torch.device("cpu"))
    fit = bundle.spec.input_fit if bundle.spec is not None else None
    if fit is None:
        raise SystemExit(f"{bundle.name}: no input-fit check declared")
    print(f"{bundle.name} {bundle.info.version}: threshold {fit.threshold:.2f}")
    for path in args.files:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        series = Series(series_instance_uid=str(header.SeriesInstanceUID),
                        instances=[Instance(path=path, header=header)])
        prepared = prepare_series(bundle, series, datetime.now(UTC)).images
        if not prepared:
            print(f"{path}: does not decode")
            continue
        batch = torch.from_numpy(prepared[0].model_input[None])
        # The network's forward pass is all the check needs; its outputs are not used here.
        with torch.inference_mode():
            scores, _ = input_fit.scored(bundle, fit, functools.partial(bundle.network, batch))
        verdict = "rejected" if scores[0] > fit.threshold else "passes"
        print(f"{path}: {scores[0]:.1f} ({verdict})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
