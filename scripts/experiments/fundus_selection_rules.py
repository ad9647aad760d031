"""Which weights to ship — the best validation epoch or the weight average — judged on
validation images the rule did not look at.

``snapshots`` trains the ``fundus-dr`` recipe once per seed without early stopping and keeps
the weights after every epoch; such a run's trajectory never depends on validation, so any rule
can be replayed on it afterwards. ``compare`` replays them. For each of
``--splits`` stratified halvings of the official validation split (120 images, patient-disjoint
from training), the best-epoch rule picks its epoch on one half (with the recipe's patience)
and is scored on the other; the averaged weights pick nothing and are scored on the same half.
Both are therefore judged on images no choice was made on, which the shipped validation
figure of the best-epoch rule is not.

Caveat: RetinaMNIST carries no patient identity, so the two halves may share a patient; that
helps the best-epoch rule (its choice transfers better), not the average.

The ensemble rule averages the logits of every seed's best epoch (each chosen on the
selection half) and is compared with the seeds' mean single-model score on the same half.

The averaged weights are those of stochastic weight averaging (Izmailov et al. 2018): the
mean of the weights after epochs ``k`` … last, BatchNorm statistics recomputed on the
unaugmented training images.

Usage (about 4 minutes per seed on one core, then 2 minutes)::

    python scripts/experiments/fundus_selection_rules.py snapshots DIR --seeds 0 1 2 3
    python scripts/experiments/fundus_selection_rules.py compare DIR --average-from 5 10 20
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

from dicom_ai.inference.runner import calibrated_softmax as softmax
from dicom_ai.train.datasets import ImageSet
from dicom_ai.train.loop import fit, predict_logits
from dicom_ai.train.metrics import macro_auc
from dicom_ai.train.recipes import RECIPES
from dicom_ai.train.run import build_network, load_splits

RECIPE = RECIPES["fundus-dr"]

Probs = npt.NDArray[np.float64]


def stratified_halves(labels: npt.NDArray[np.int64],
                      rng: np.random.Generator) -> tuple[npt.NDArray[np.int64],
                                                         npt.NDArray[np.int64]]:
    a: list[int] = []
    b: list[int] = []
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        # Odd class counts alternate which half gets the extra image.
        cut = (len(idx) + int(rng.integers(0, 2))) // 2
        a.extend(idx[:cut].tolist())
        b.extend(idx[cut:].tolist())
    return np.array(sorted(a)), np.array(sorted(b))


def best_epoch(epoch_probs: list[Probs], labels: npt.NDArray[np.int64],
               index: npt.NDArray[np.int64], patience: int) -> int:
    """The epoch (0-based) ``fit`` would return when validating on ``index`` only."""
    best, best_auc = 0, -1.0
    for e, p in enumerate(epoch_probs):
        auc = macro_auc(labels[index], p[index])
        if auc > best_auc:
            best, best_auc = e, auc
        if e - best >= patience:
            break
    return best


def snapshots(train: ImageSet, val: ImageSet, out: Path, seeds: list[int],
              init: dict[str, torch.Tensor] | None = None, lr: float | None = None) -> None:
    """Per seed, ``out/seed<N>.pt``: the list of state dicts after each epoch; with ``init``,
    each run starts from those weights (every layer but the classifier ``fc``) instead of the
    seed's random ones; with ``lr``, at that peak learning rate instead of the recipe's."""
    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        # No early stop, and a time budget the run never reaches, so the learning-rate
        # schedule follows the steps alone as in an unhurried recipe run.
        loop = dataclasses.replace(RECIPE.loop, seed=seed, patience=RECIPE.loop.epochs + 1,
                                   max_minutes=24 * 60.0, lr=lr or RECIPE.loop.lr)
        torch.manual_seed(seed)
        net = build_network(RECIPE.network_def)
        if init is not None:
            missing, _ = net.load_state_dict(
                {k: v for k, v in init.items() if not k.startswith("fc.")}, strict=False)
            if any(not k.startswith("fc.") for k in missing):
                raise ValueError(f"--init lacks layers of the network: {missing}")
        states: list[dict[str, torch.Tensor]] = []

        def keep(line: str, net: nn.Module = net,
                 states: list[dict[str, torch.Tensor]] = states) -> None:
            print(line, flush=True)
            if line.startswith("epoch"):
                states.append({k: v.detach().clone() for k, v in net.state_dict().items()})

        fit(net, train, val, len(RECIPE.labels), RECIPE.augment, loop, keep)
        torch.save(states, out / f"seed{seed}.pt")


def epoch_probs(states: list[dict[str, torch.Tensor]], val: ImageSet) -> list[Probs]:
    """Validation probabilities of each of a run's per-epoch weights."""
    probs = []
    for state in states:
        net = build_network(RECIPE.network_def)
        net.load_state_dict(state)
        probs.append(softmax(predict_logits(net, val.images)))
    return probs


def averaged_probs(states: list[dict[str, torch.Tensor]], start: int, train: ImageSet,
                   val: ImageSet) -> Probs:
    """Validation probabilities of the mean of the weights after epochs ``start`` … last."""
    net = build_network(RECIPE.network_def)
    avg = AveragedModel(net)
    for state in states[start - 1:]:
        net.load_state_dict(state)
        avg.update_parameters(net)
    batch = RECIPE.loop.batch_size
    update_bn((torch.from_numpy(train.images[s:s + batch].astype(np.float32))
               for s in range(0, len(train.labels), batch)), avg)
    net.load_state_dict(avg.module.state_dict())
    return softmax(predict_logits(net, val.images))


def compare(train: ImageSet, val: ImageSet, folder: Path, splits: int,
            average_from: list[int]) -> None:
    """Print each rule's macro AUC on held-out validation halves, and its paired difference
    from the best-epoch rule."""
    seeds: list[tuple[str, list[Probs], dict[int, Probs]]] = []
    for f in sorted(folder.glob("seed*.pt")):
        snaps = torch.load(f, weights_only=True)
        per_epoch = epoch_probs(snaps, val)
        averaged: dict[int, Probs] = {}
        for start in average_from:
            averaged[start] = averaged_probs(snaps, start, train, val)
        seeds.append((f.stem, per_epoch, averaged))
        print(f"{f.stem}: {len(snaps)} epochs; full-validation AUC "
              f"best {max(macro_auc(val.labels, p) for p in per_epoch):.4f}, "
              + ", ".join(f"average>={s} {macro_auc(val.labels, p):.4f}"
                          for s, p in averaged.items()), flush=True)

    rng = np.random.default_rng(0)
    rules = ["best_epoch", "last_epoch"] + [f"average>={s}" for s in average_from]
    scores: dict[str, list[list[float]]] = {r: [[] for _ in seeds] for r in rules}
    ensemble: list[float] = []
    averaged_ensembles: dict[int, list[float]] = {}
    for _ in range(splits):
        for select, held in (stratified_halves(val.labels, rng)[::d] for d in (1, -1)):
            chosen = []
            for i, (_, per_epoch, averaged) in enumerate(seeds):
                e = best_epoch(per_epoch, val.labels, select, RECIPE.loop.patience)
                chosen.append(per_epoch[e][held])
                scores["best_epoch"][i].append(macro_auc(val.labels[held],
                                                         per_epoch[e][held]))
                scores["last_epoch"][i].append(macro_auc(val.labels[held],
                                                         per_epoch[-1][held]))
                for s, p in averaged.items():
                    scores[f"average>={s}"][i].append(macro_auc(val.labels[held], p[held]))
            # Softmax ignores a per-image shift, so the mean of log-probabilities is the
            # mean of the logits: what an ensemble network that averages logits outputs.
            ensemble.append(macro_auc(val.labels[held],
                                      softmax(np.mean(np.log(chosen), axis=0))))
            for start in average_from:
                members = [np.log(averaged[start][held]) for _, _, averaged in seeds]
                averaged_ensembles.setdefault(start, []).append(
                    macro_auc(val.labels[held], softmax(np.mean(members, axis=0))))

    print(f"\nheld-out-half macro AUC over {len(seeds)} seeds x {2 * splits} halves")
    base = np.array(scores["best_epoch"])
    for r in rules:
        rule = np.array(scores[r])
        per_seed = rule.mean(axis=1)
        line = (f"{r:12s} mean {rule.mean():.4f}  per-seed [{per_seed.min():.4f}, "
                f"{per_seed.max():.4f}]")
        if r != "best_epoch":
            d = (rule - base).mean(axis=1)
            line += (f"  minus best_epoch {d.mean():+.4f} (seeds where higher: "
                     f"{int((d > 0).sum())}/{len(d)}; halves where higher "
                     f"{float(((rule - base) > 0).mean()):.2f})")
        print(line)
    # The seeds' mean on each half is what one model of the ensemble scores there on average.
    gain = np.array(ensemble) - base.mean(axis=0)
    print(f"ensemble of the {len(seeds)} seeds' best epochs (mean logits) "
          f"mean {np.mean(ensemble):.4f}  minus one seed's best_epoch {gain.mean():+.4f} "
          f"(halves where higher {float((gain > 0).mean()):.2f})")
    for start, values in averaged_ensembles.items():
        gain = np.array(values) - base.mean(axis=0)
        print(f"ensemble of the {len(seeds)} seeds' average>={start} (mean logits) "
              f"mean {np.mean(values):.4f}  minus one seed's best_epoch {gain.mean():+.4f} "
              f"(halves where higher {float((gain > 0).mean()):.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["snapshots", "compare"])
    ap.add_argument("folder", type=Path, help="where the seed<N>.pt per-epoch weights are")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--init", type=Path, help="snapshots: a state dict to start each run from "
                                              "(scripts/experiments/fundus_pretraining.py)")
    ap.add_argument("--lr", type=float, help="snapshots: peak learning rate (default: the "
                                             "recipe's)")
    ap.add_argument("--splits", type=int, default=100,
                    help="stratified halvings of validation; each half is held out once")
    ap.add_argument("--average-from", type=int, nargs="+", default=[5])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dicom-ai")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, val = load_splits(RECIPE, args.data, args.cache)
    if args.command == "snapshots":
        init = torch.load(args.init, weights_only=True) if args.init else None
        snapshots(train, val, args.folder, args.seeds, init, args.lr)
    else:
        compare(train, val, args.folder, args.splits, args.average_from)


if __name__ == "__main__":
    main()
