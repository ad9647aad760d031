"""Validation report of a bundle: AUC with bootstrap CI, operating point, confusion matrix,
calibration error, ROC and reliability plots."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dicom_ai.inference.runner import calibrated_softmax as softmax
from dicom_ai.train.metrics import (
    binary_auc,
    bootstrap_ci,
    confusion_matrix,
    expected_calibration_error,
    macro_auc,
    operating_point,
    reliability_bins,
)

BOOTSTRAP_RESAMPLES = 2000


@dataclass
class BinaryReport:
    """Figures of one binary decision (pneumonia, or referable DR)."""

    label: str
    auc: float
    auc_ci: tuple[float, float]
    threshold: float
    sensitivity: float
    sensitivity_ci: tuple[float, float]
    specificity: float
    specificity_ci: tuple[float, float]
    accuracy: float
    confusion: list[list[int]]
    criterion: str


@dataclass
class ClassAUC:
    """One-vs-rest AUC of one class of a many-class model (or the mean of several)."""

    label: str
    auc: float
    auc_ci: tuple[float, float]


@dataclass
class Report:
    """Everything ``dicom-ai evaluate`` prints for a model on its validation split."""

    model: str
    n: int
    class_counts: list[int]
    labels: list[str]
    temperature: float
    auc: float
    auc_ci: tuple[float, float]
    accuracy: float
    confusion: list[list[int]]
    ece_raw: float
    ece_calibrated: float
    binary: list[BinaryReport] = field(default_factory=list)
    #: One-vs-rest AUC per class, for models with more than two classes.
    per_class: list[ClassAUC] = field(default_factory=list)
    #: Mean of the one-vs-rest AUCs the bundle's ``mean_auc_of`` names, when it names any.
    mean_auc: ClassAUC | None = None

    def metrics(self) -> dict[str, Any]:
        """The ``eval_metrics`` block of ``metadata.json``."""
        out: dict[str, Any] = {
            "split": "validation",
            "n": self.n,
            "auc": round(self.auc, 4),
            "auc_ci95": [round(v, 4) for v in self.auc_ci],
            "accuracy": round(self.accuracy, 4),
            "ece_calibrated": round(self.ece_calibrated, 4),
        }
        if self.per_class:
            out["one_vs_rest"] = {c.label: {"auc": round(c.auc, 4),
                                            "auc_ci95": [round(v, 4) for v in c.auc_ci]}
                                  for c in self.per_class}
        if self.mean_auc is not None:
            out["mean_auc"] = {"of": self.mean_auc.label, "auc": round(self.mean_auc.auc, 4),
                               "auc_ci95": [round(v, 4) for v in self.mean_auc.auc_ci]}
        for b in self.binary:
            out[b.label] = {
                "auc": round(b.auc, 4), "auc_ci95": [round(v, 4) for v in b.auc_ci],
                "threshold": round(b.threshold, 6), "sensitivity": round(b.sensitivity, 4),
                "specificity": round(b.specificity, 4), "accuracy": round(b.accuracy, 4)}
        return out


def _proportion_ci(hits: npt.NDArray[np.bool_], seed: int) -> tuple[float, float]:
    return bootstrap_ci(lambda i: float(hits[i].mean()), len(hits),
                        resamples=BOOTSTRAP_RESAMPLES, seed=seed)


def binary_report(label: str, y: npt.NDArray[np.int64], score: npt.NDArray[np.float64],
                  threshold: float, criterion: str) -> BinaryReport:
    """AUC with 95 % bootstrap CI and the operating point ``score >= threshold``; the CIs of
    sensitivity and specificity bootstrap positives and negatives separately."""
    auc_ci = bootstrap_ci(lambda i: binary_auc(y[i], score[i]), len(y),
                          resamples=BOOTSTRAP_RESAMPLES)
    op = operating_point(y, score, threshold)
    pred = score >= threshold
    return BinaryReport(
        label=label, auc=binary_auc(y, score), auc_ci=auc_ci, threshold=threshold,
        sensitivity=op.sensitivity, sensitivity_ci=_proportion_ci(pred[y == 1], 1),
        specificity=op.specificity, specificity_ci=_proportion_ci(~pred[y == 0], 2),
        accuracy=float((pred == (y == 1)).mean()),
        confusion=confusion_matrix(y, pred.astype(np.int64), 2).tolist(), criterion=criterion)


def one_vs_rest(labels: npt.NDArray[np.int64], probs: npt.NDArray[np.float64],
                classes: list[int], name: str) -> ClassAUC:
    """Mean one-vs-rest AUC of ``classes`` (one class: its AUC) with a 95 % bootstrap CI; the
    bootstrap resamples images, so the classes' AUCs move together as they do in a test set."""

    def mean_auc(i: npt.NDArray[np.int64]) -> float:
        return float(np.mean([binary_auc((labels[i] == k).astype(np.int64), probs[i, k])
                              for k in classes]))

    ci = bootstrap_ci(mean_auc, len(labels), resamples=BOOTSTRAP_RESAMPLES)
    return ClassAUC(name, mean_auc(np.arange(len(labels))), ci)


def build_report(meta: dict[str, Any], labels: npt.NDArray[np.int64],
                 logits: npt.NDArray[np.float64]) -> Report:
    """Validation report from the bundle metadata and the network's validation logits."""
    cfg = meta["dicom_ai"]
    names = list(cfg["labels"])
    temperature = float(cfg["temperature"])
    probs = softmax(logits, temperature)
    k = len(names)
    if k == 2:
        auc = binary_auc(labels, probs[:, 1])
        auc_ci = bootstrap_ci(lambda i: binary_auc(labels[i], probs[i, 1]), len(labels),
                              resamples=BOOTSTRAP_RESAMPLES)
    else:
        auc = macro_auc(labels, probs)
        auc_ci = bootstrap_ci(lambda i: macro_auc(labels[i], probs[i]), len(labels),
                              resamples=BOOTSTRAP_RESAMPLES)
    decision = cfg["decision"]
    if decision["kind"] == "threshold":
        pos = names.index(decision["label"])
        predicted = np.where(probs[:, pos] >= decision["threshold"], pos, 1 - pos)
    else:
        predicted = probs.argmax(axis=1)
    report = Report(
        model=str(meta.get("name", "")), n=len(labels),
        class_counts=np.bincount(labels, minlength=k).tolist(), labels=names,
        temperature=temperature, auc=auc, auc_ci=auc_ci,
        accuracy=float((predicted == labels).mean()),
        confusion=confusion_matrix(labels, predicted, k).tolist(),
        ece_raw=expected_calibration_error(softmax(logits), labels),
        ece_calibrated=expected_calibration_error(probs, labels))
    if k > 2:
        report.per_class = [one_vs_rest(labels, probs, [i], n) for i, n in enumerate(names)]
    if cfg.get("mean_auc_of"):
        members = [names.index(n) for n in cfg["mean_auc_of"]]
        report.mean_auc = one_vs_rest(labels, probs, members, " + ".join(cfg["mean_auc_of"]))
    if decision["kind"] == "threshold":
        pos = names.index(decision["label"])
        report.binary.append(binary_report(decision["label"], (labels == pos).astype(np.int64),
                                           probs[:, pos], float(decision["threshold"]),
                                           decision.get("criterion", "")))
    for derived in cfg.get("derived_findings", []):
        members = [names.index(n) for n in derived["sum_of"]]
        y = np.isin(labels, members).astype(np.int64)
        report.binary.append(binary_report(derived["label"], y, probs[:, members].sum(axis=1),
                                           float(derived["threshold"]),
                                           derived.get("criterion", "")))
    return report


def _ci(ci: tuple[float, float]) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _matrix(rows: list[list[int]], names: list[str]) -> list[str]:
    width = max(len(n) for n in names) + 2
    head = " " * width + "".join(f"{n:>{width}}" for n in names)
    lines = ["  true \\ predicted", "  " + head]
    lines += ["  " + f"{n:<{width}}" + "".join(f"{v:>{width}d}" for v in r)
              for n, r in zip(names, rows, strict=True)]
    return lines


def format_report(report: Report) -> str:
    """Plain-text report, as printed by ``dicom-ai evaluate`` and pasted into the model card."""
    counts = ", ".join(f"{n} {c}" for n, c in zip(report.labels, report.class_counts,
                                                    strict=True))
    kind = "AUC" if len(report.labels) == 2 else "AUC (one-vs-rest macro)"
    lines = [
        f"model {report.model} — validation split, n = {report.n} ({counts})",
        f"{kind}: {report.auc:.4f}  95% CI {_ci(report.auc_ci)} "
        f"(bootstrap, {BOOTSTRAP_RESAMPLES} resamples)",
        f"accuracy at the bundle's decision rule: {report.accuracy:.4f}",
        f"temperature {report.temperature:.3f}; ECE (15 bins) {report.ece_raw:.4f} before, "
        f"{report.ece_calibrated:.4f} after temperature scaling",
        "confusion matrix:",
        *_matrix(report.confusion, report.labels),
    ]
    for c in report.per_class:
        lines.append(f"{c.label} vs rest: AUC {c.auc:.4f}  95% CI {_ci(c.auc_ci)}")
    if report.mean_auc is not None:
        lines.append(f"mean AUC of {report.mean_auc.label}: {report.mean_auc.auc:.4f}  "
                     f"95% CI {_ci(report.mean_auc.auc_ci)}")
    for b in report.binary:
        lines += [
            f"{b.label}: AUC {b.auc:.4f}  95% CI {_ci(b.auc_ci)}",
            f"  operating point p >= {b.threshold:.4f} ({b.criterion})",
            f"  sensitivity {b.sensitivity:.4f} {_ci(b.sensitivity_ci)}, specificity "
            f"{b.specificity:.4f} {_ci(b.specificity_ci)}, accuracy {b.accuracy:.4f}",
            *_matrix(b.confusion, [f"not {b.label}", b.label]),
        ]
    lines.append("Calibration and operating points were chosen on this same validation split, "
                 "so threshold-dependent figures are slightly optimistic.")
    return "\n".join(lines)


def write_plots(report: Report, labels: npt.NDArray[np.int64], logits: npt.NDArray[np.float64],
                meta: dict[str, Any], out_dir: Path) -> list[Path]:
    """ROC curve(s) and a reliability diagram as PNG files in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    out_dir.mkdir(parents=True, exist_ok=True)
    names = report.labels
    probs = softmax(logits, report.temperature)
    fig, ax = plt.subplots(figsize=(5, 5))
    curves: list[tuple[str, npt.NDArray[np.int64], npt.NDArray[np.float64]]] = []
    if len(names) > 2:
        curves += [(n, (labels == k).astype(np.int64), probs[:, k]) for k, n in enumerate(names)]
    for b in report.binary:
        members = ([names.index(b.label)] if b.label in names else
                   [names.index(n) for d in meta["dicom_ai"]["derived_findings"]
                    if d["label"] == b.label for n in d["sum_of"]])
        curves.append((b.label, np.isin(labels, members).astype(np.int64),
                       probs[:, members].sum(axis=1)))
    for name, y, s in curves:
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} (AUC {binary_auc(y, s):.3f})")
    for b in report.binary:
        ax.plot(1 - b.specificity, b.sensitivity, "ko")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 − specificity", ylabel="sensitivity",
           title=f"{report.model}: ROC on validation (n={report.n})")
    ax.legend(loc="lower right", fontsize=8)
    roc_path = out_dir / "roc.png"
    fig.savefig(roc_path, dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    for title, p in (("raw", softmax(logits)), ("temperature-scaled", probs)):
        conf, acc, counts = reliability_bins(p.max(axis=1), p.argmax(axis=1) == labels)
        filled = counts > 0
        ax.plot(conf[filled], acc[filled], "o-", label=title)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="confidence (top class)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"{report.model}: reliability (ECE {report.ece_calibrated:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    cal_path = out_dir / "calibration.png"
    fig.savefig(cal_path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [roc_path, cal_path]
