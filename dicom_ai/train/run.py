"""Train one recipe end to end: data → split → network from its bundle config → fit → weights."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from monai.bundle.config_parser import ConfigParser
from torch import nn

from dicom_ai.inference.ensemble import network_of
from dicom_ai.train.datasets import ImageSet, load_cxr, load_fundus, load_isic, split_by_patient
from dicom_ai.train.loop import History, LoopConfig, fit
from dicom_ai.train.recipes import RECIPES, Recipe

#: Fraction of Kermany patients held out for validation, and the seed of that split.
CXR_VAL_FRACTION = 0.15
SPLIT_SEED = 20180222


def build_network(network_def: dict[str, Any]) -> nn.Module:
    """The network exactly as the bundle loader builds it from ``configs/inference.json``."""
    net = ConfigParser({"network_def": network_def}).get_parsed_content("network_def")
    if not isinstance(net, nn.Module):
        raise TypeError(f"network_def built {type(net).__name__}, not a torch module")
    return net


def load_splits(recipe: Recipe, data_dir: Path, cache_dir: Path) -> tuple[ImageSet, ImageSet]:
    """Training and validation sets of a recipe, normalized as at inference.

    Kermany's validation split is carved by patient (15 %, stratified); RetinaMNIST and ISIC
    2017 bring their own.
    """
    if recipe.dicom_ai["input"] == "dermoscopy":
        return load_isic(data_dir / "skin" / "isic2017", recipe.size, cache_dir)
    if recipe.dicom_ai["input"] == "xray":
        full = load_cxr(data_dir / "cxr" / "kermany224", recipe.size, cache_dir)
        train_idx, val_idx = split_by_patient(full.patients, full.labels,
                                              val_fraction=CXR_VAL_FRACTION, seed=SPLIT_SEED)
        return full.subset(train_idx), full.subset(val_idx)
    return load_fundus(data_dir / "fundus" / "retinamnist28_trainval.npz", recipe.size,
                       cache_dir)


def bundle_recipe(meta: dict[str, Any]) -> Recipe:
    """The recipe of a bundle's model at the input size the bundle says (its
    ``configs/metadata.json``), so that a bundle is evaluated as it runs, whatever size the
    recipe in this checkout trains at.

    Raises
    ------
    KeyError
        The bundle is not one of :data:`~dicom_ai.train.recipes.RECIPES`.
    """
    recipe = RECIPES[str(meta.get("name"))]
    rows, cols = meta["dicom_ai"]["preprocessing"]["size"]
    return dataclasses.replace(recipe, size=(int(rows), int(cols)))


def train_model(recipe: Recipe, *, data_dir: Path, cache_dir: Path, out_dir: Path,
                epochs: int | None = None, threads: int = 1, init: Path | None = None,
                log: Callable[[str], None] = print) -> tuple[nn.Module, list[History]]:
    """Train ``recipe`` and write ``out_dir/models/model.pt`` (state dict) and
    ``out_dir/docs/training.json`` (recipe, split sizes, per-epoch history, environment).

    An ensemble recipe (``members`` > 1) trains member ``k`` exactly as the single network
    would be trained with seed ``loop.seed + k``, one after the other; the history of each is
    returned and recorded.

    ``threads`` is torch's intra-op thread count on the CPU. One is the default because on a
    CPU shared with other jobs each multi-threaded operator waits for its slowest thread: with
    two threads and four busy processes on two cores, one fundus epoch took 353 s instead of
    about 3 s.

    Every epoch is checkpointed to :func:`checkpoint_path` under ``cache_dir`` (one file per
    member); a run cut off at any moment resumes from there when started again, a finished
    member's checkpoint returning its weights at once, and the checkpoints are deleted once
    the weights are written.

    A recipe with a :class:`~dicom_ai.train.recipes.WarmStart` starts from ``init``, a state
    dict whose SHA-256 must be the recipe's.

    Raises
    ------
    ValueError
        The recipe has a warm start and ``init`` is missing or holds other weights.
    """
    torch.set_num_threads(threads)
    train, val = load_splits(recipe, data_dir, cache_dir)
    log(f"{recipe.name}: train {len(train.labels)} images / "
        f"{len(set(train.patients))} patients, val {len(val.labels)} / "
        f"{len(set(val.patients))}; input {recipe.size}")
    loop = recipe.loop if epochs is None else dataclasses.replace(recipe.loop, epochs=epochs)
    members: list[nn.Module] = []
    histories: list[History] = []
    for k in range(recipe.members):
        member_loop, member = member_network(recipe, loop, k, init, log)
        histories.append(fit(member, train, val, len(recipe.labels), recipe.augment,
                             member_loop, log, checkpoint=checkpoint_path(recipe, cache_dir, k)))
        members.append(member.cpu())
    net = network_of(members)
    (out_dir / "models").mkdir(parents=True, exist_ok=True)
    (out_dir / "docs").mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out_dir / "models" / "model.pt")
    record = {
        "recipe": recipe.name,
        "loop": dataclasses.asdict(loop),
        "members": recipe.members,
        "augment": dataclasses.asdict(recipe.augment),
        "size": list(recipe.size),
        "warm_start": dataclasses.asdict(recipe.warm_start) if recipe.warm_start else None,
        "train_images": len(train.labels),
        "val_images": len(val.labels),
        "train_patients": len(set(train.patients)),
        "val_patients": len(set(val.patients)),
        "history": [dataclasses.asdict(h) for h in histories] if recipe.members > 1
        else dataclasses.asdict(histories[0]),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} threads, "
                   f"{'cuda' if torch.cuda.is_available() else 'cpu'}",
    }
    (out_dir / "docs" / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    for k in range(recipe.members):
        checkpoint_path(recipe, cache_dir, k).unlink(missing_ok=True)
    return net, histories


def member_network(recipe: Recipe, loop: LoopConfig, member: int, init: Path | None,
                   log: Callable[[str], None]) -> tuple[LoopConfig, nn.Module]:
    """Ensemble member ``member``'s loop (seed ``loop.seed + member``) and its network,
    initialised from that seed, or from the recipe's warm start read from ``init``."""
    member_loop = dataclasses.replace(loop, seed=loop.seed + member)
    torch.manual_seed(member_loop.seed)
    net = build_network(recipe.network_def)
    if recipe.warm_start is not None:
        net.load_state_dict(warm_start_weights(recipe, init))
        log(f"{recipe.name}: warm start from {recipe.warm_start.source}")
    if recipe.members > 1:
        log(f"{recipe.name}: member {member + 1} of {recipe.members}, seed {member_loop.seed}")
    return member_loop, net


def module_state(net: nn.Module, modules: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The part of ``net``'s state dict that belongs to its top-level ``modules``."""
    prefixes = tuple(f"{m}." for m in modules)
    return {k: v for k, v in net.state_dict().items() if k.startswith(prefixes)}


def load_warm_start(net: nn.Module, modules: tuple[str, ...],
                    state: dict[str, torch.Tensor]) -> None:
    """Copy ``state``, the weights of ``net``'s top-level ``modules`` (a pretrained encoder),
    into ``net``; the rest of ``net`` keeps its initialisation.

    Raises
    ------
    ValueError
        ``state`` lacks a weight of ``modules`` or holds one outside them.
    """
    wanted = module_state(net, modules).keys()
    absent = sorted(wanted - state.keys())
    foreign = sorted(state.keys() - wanted)
    if absent or foreign:
        raise ValueError(f"warm start of {', '.join(modules)}: missing {absent[:3]}, "
                         f"not of those modules {foreign[:3]}")
    net.load_state_dict(state, strict=False)


def checkpoint_path(recipe: Recipe, cache_dir: Path, member: int = 0) -> Path:
    """Where :func:`train_model` checkpoints ``recipe``'s ``member`` (scratch space, never
    the bundle)."""
    suffix = f"-member{member}" if recipe.members > 1 else ""
    return cache_dir / "checkpoints" / f"{recipe.name}{suffix}.pt"


def warm_start_weights(recipe: Recipe, init: Path | None) -> dict[str, torch.Tensor]:
    """The state dict a recipe's warm start names, read from ``init`` once its SHA-256 matches.

    Raises
    ------
    ValueError
        ``recipe`` has no warm start, ``init`` is None, or the file's SHA-256 differs.
    """
    if recipe.warm_start is None:
        raise ValueError(f"{recipe.name} has no warm start")
    if init is None:
        raise ValueError(f"{recipe.name} starts from {recipe.warm_start.source} "
                         f"(sha256 {recipe.warm_start.sha256}); pass it with --init")
    digest = hashlib.sha256(init.read_bytes()).hexdigest()
    if digest != recipe.warm_start.sha256:
        raise ValueError(f"{init}: sha256 {digest}, but {recipe.name} starts from "
                         f"{recipe.warm_start.source} (sha256 {recipe.warm_start.sha256})")
    state: dict[str, torch.Tensor] = torch.load(init, map_location="cpu", weights_only=True)
    return state
