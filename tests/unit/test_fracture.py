"""xr-fracture: box decoding, mapping to the source grid, training targets and resume (refused
with other settings), routing, and the findings an analysed radiograph produces."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import astuple
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset

from dicom_ai.config import InferenceSettings
from dicom_ai.dicom.model import Instance, Series
from dicom_ai.inference import routing
from dicom_ai.inference.bundle import BundleError, _validate_block, load_bundle
from dicom_ai.inference.fracture import (
    analyse_fracture,
    body_part_site,
    display_marker,
    forward,
    reported_boxes,
)
from dicom_ai.inference.fracture_net import (
    Box,
    FractureNet,
    decode_boxes,
    image_score,
    iou,
    nms,
    to_source,
)
from dicom_ai.inference.spec import BoxRule, SpecError, parse_fracture
from dicom_ai.results.codes import FRACTURE_SITES
from dicom_ai.train import fracture as tf
from dicom_ai.train.loop import CheckpointMismatch, LoopConfig
from dicom_ai.train.recipes import CXR_PNEUMONIA
from dicom_ai.train.run import build_network
from tests.conftest import MakeDicom
from tests.fracture_data import tiny_fracture_set

REPO = Path(__file__).resolve().parents[2]

TINY_NET: dict[str, Any] = {"_target_": "dicom_ai.inference.fracture_net.FractureNet",
                            "widths": [4, 4, 4, 4, 4], "fpn_channels": 4, "dropout": 0.5}


def test_decode_boxes_by_hand() -> None:
    heat = np.zeros((8, 8))
    heat[2, 3] = 0.9
    heat[5, 5] = 0.5
    heat[5, 6] = 0.4  # next to a higher cell: not a peak
    log_size = np.zeros((2, 8, 8))
    log_size[:, 2, 3] = (math.log(2.0), math.log(3.0))
    boxes = decode_boxes(heat, log_size, stride=4, min_score=0.1)
    # Cell (2, 3) is centred at x = 3.5·4 = 14, y = 2.5·4 = 10; 2×3 cells = 8×12 px.
    assert astuple(boxes[0]) == pytest.approx((10.0, 4.0, 18.0, 16.0, 0.9))
    # Cell (5, 5): centre (22, 22), size e^0 = 1 cell = 4 px.
    assert astuple(boxes[1]) == pytest.approx((20.0, 20.0, 24.0, 24.0, 0.5))
    assert len(boxes) == 2
    assert decode_boxes(heat, log_size, stride=4, min_score=0.6) == boxes[:1]


def test_image_score_by_hand() -> None:
    logit = torch.tensor([[2.0], [-1.0]])
    heat = torch.full((2, 1, 2, 3), -5.0)
    heat[0, 0, 1, 2] = 4.0
    heat[1, 0, 0, 0] = 1.0
    assert image_score(logit, heat, 0.0).tolist() == [2.0, -1.0]
    assert image_score(logit, heat, 1.0).tolist() == [4.0, 1.0]
    # The mean: (2 + 4) / 2 and (-1 + 1) / 2.
    assert image_score(logit, heat, 0.5).tolist() == [3.0, 0.0]
    assert image_score(logit, heat, 0.5).dtype == torch.float64


def test_iou_and_nms_by_hand() -> None:
    a, b = Box(0, 0, 10, 10, 0.9), Box(5, 0, 15, 10, 0.8)
    assert iou(a, b) == pytest.approx(50 / 150)
    c = Box(20, 20, 30, 30, 0.7)
    assert nms([b, c, a], 0.4) == [a, b, c]
    assert nms([b, c, a], 0.3) == [a, c]


def test_box_to_source_undoes_the_aspect_pad() -> None:
    # A 100-row × 200-column image in 256×256: scale 1.28, 128 rows at top = 64, left = 0.
    content = (64, 0, 128, 256)
    box = Box(32.0, 96.0, 64.0, 128.0, 1.0)
    assert to_source(box, content, (100, 200)) == pytest.approx((25.0, 25.0, 50.0, 50.0))
    # Whatever lies in the padding is clipped to the image.
    assert to_source(Box(-8, 0, 300, 80, 1.0), content, (100, 200)) == \
        pytest.approx((0.0, 0.0, 200.0, 12.5))


def test_dataset_boxes_round_trip_to_source() -> None:
    rows = [{"cx": "0.5", "cy": "0.5", "w": "0.1", "h": "0.2"}]
    inside = tf.boxes_in_input(rows, (100, 200), (256, 256))
    # x: 0.45·256 … 0.55·256; y: 64 + 0.4·128 … 64 + 0.6·128.
    assert inside[0] == pytest.approx([115.2, 115.2, 140.8, 140.8])
    back = to_source(Box(*map(float, inside[0]), 1.0), (64, 0, 128, 256), (100, 200))
    assert back == pytest.approx((90.0, 40.0, 110.0, 60.0))


def test_targets_peak_at_the_box_centre() -> None:
    boxes = [np.array([[10.0, 4.0, 18.0, 16.0]], dtype=np.float32), np.zeros((0, 4), np.float32)]
    heat, log_size, mask = tf.targets(boxes, (32, 32), stride=4)
    assert heat.shape == (2, 1, 8, 8)
    assert heat[0, 0, 2, 3] == 1.0 and int(mask[0].sum()) == 1 and mask[0, 0, 2, 3] == 1.0
    assert log_size[0, :, 2, 3].tolist() == pytest.approx([math.log(2.0), math.log(3.0)])
    assert float(heat[1].sum()) == 0.0
    # Decoding the ideal outputs gives the box back.
    decoded = decode_boxes(heat[0, 0].numpy(), log_size[0].numpy(), stride=4, min_score=0.5)
    assert [astuple(b) for b in decoded] == [pytest.approx((10.0, 4.0, 18.0, 16.0, 1.0))]


def test_boxes_follow_the_augmentation() -> None:
    box = np.array([[10.0, 20.0, 30.0, 60.0]], dtype=np.float32)
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert tf.transform_boxes(box, identity, (100, 100))[0] == pytest.approx(box[0], abs=1e-4)
    hflip = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert tf.transform_boxes(box, hflip, (100, 100))[0] == pytest.approx([70, 20, 90, 60],
                                                                          abs=1e-4)
    # Zoom 2× about the centre (output → input coordinates halve): 40…60 becomes 30…70.
    zoom = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]])
    centre = np.array([[40.0, 40.0, 60.0, 60.0]], dtype=np.float32)
    assert tf.transform_boxes(centre, zoom, (100, 100))[0] == pytest.approx([30, 30, 70, 70],
                                                                            abs=1e-4)
    # A box whose centre leaves the image is dropped.
    assert len(tf.transform_boxes(np.array([[1.0, 1.0, 5.0, 5.0]], np.float32), zoom,
                                  (100, 100))) == 0


def test_hit_and_heat_share_by_hand() -> None:
    truth = np.array([[0.0, 0.0, 8.0, 8.0]], dtype=np.float32)
    assert not tf.box_hit(Box(10, 10, 40, 40, 1.0), truth)
    assert tf.box_hit(Box(1, 1, 7, 7, 1.0), truth)  # IoU 36/64
    heat = np.zeros((4, 4), dtype=np.float32)
    heat[0, 0], heat[0, 1], heat[3, 3] = 1.0, 2.0, 1.0
    # Cells centred at (2, 2) and (6, 2) are inside the 8×8 box: 3 of 4 units of mass.
    assert tf.heat_share_inside(heat, truth, stride=4) == pytest.approx(0.75)


def test_box_hit_requires_overlap_or_centre() -> None:
    truth = np.array([[0.0, 0.0, 8.0, 8.0]], dtype=np.float32)
    # Centre (22, 22) lies outside and IoU = 16/1360 < 0.25: a miss.
    assert not tf.box_hit(Box(4, 4, 40, 40, 1.0), truth)


def test_top_box_hits_by_hand() -> None:
    # Images 0 and 2 fractured (truth at the top left); 1 normal, whatever its box.
    truth = np.array([[0.0, 0.0, 8.0, 8.0]], dtype=np.float32)
    none = np.zeros((0, 4), dtype=np.float32)
    data = tf.FractureSet(images=np.zeros((3, 1, 4, 4), np.float16),
                          labels=np.array([1, 0, 1]), boxes=(truth, none, truth),
                          regions=("hand",) * 3, names=("a", "b", "c"))
    pred = tf.Predictions(scores=np.zeros(3), heat=np.zeros((3, 1, 1), np.float32),
                          boxes=[[Box(1, 1, 7, 7, 0.9), Box(30, 30, 40, 40, 0.1)],
                                 [Box(1, 1, 7, 7, 0.9)], []])
    assert tf.top_box_hits(data, pred).tolist() == [True, False]
    # Only the top box counts: a hit in second place does not.
    pred.boxes[0].reverse()
    assert tf.top_box_hits(data, pred).tolist() == [False, False]


def test_resumed_training_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    data = tiny_fracture_set()
    # A budget that never binds: the schedule then depends on steps only.
    cfg = LoopConfig(epochs=2, batch_size=4, lr=2e-3, max_minutes=1e9)

    def net() -> torch.nn.Module:
        torch.manual_seed(1)
        return FractureNet(widths=(4, 4, 4, 4, 4), fpn_channels=4, dropout=0.5)

    straight = net()
    tf.train(straight, data, data, cfg, checkpoint=tmp_path / "a.pt", log=lambda _s: None)

    def killed_after_first_epoch(line: str) -> None:
        if line.startswith("epoch   1"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tf.train(net(), data, data, cfg, checkpoint=tmp_path / "b.pt",
                 log=killed_after_first_epoch)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["state"]["epoch"] == 1
    resumed = net()
    state = tf.train(resumed, data, data, cfg, checkpoint=tmp_path / "b.pt", resume=True,
                     log=lambda _s: None)
    assert state.epoch == 2 and len(state.history) == 2
    # Same best epoch, same weights: the cut cost nothing.
    ck_a = torch.load(tmp_path / "a.pt", weights_only=True)
    ck_b = torch.load(tmp_path / "b.pt", weights_only=True)
    for key, value in ck_a["net"].items():
        assert torch.allclose(value.float(), ck_b["net"][key].float(), atol=1e-6), key
    # Resuming with other settings would mix two runs: refused.
    for other in (dataclasses.replace(cfg, lr=1e-3), dataclasses.replace(cfg, epochs=3)):
        with pytest.raises(CheckpointMismatch, match="other settings"):
            tf.train(net(), data, data, other, checkpoint=tmp_path / "b.pt", resume=True,
                     log=lambda _s: None)
    with pytest.raises(CheckpointMismatch, match="other settings"):
        tf.train(net(), data, data, cfg, checkpoint=tmp_path / "b.pt", resume=True,
                 aug=dataclasses.replace(tf.RECIPE.augment, vflip=False), log=lambda _s: None)


def _series(**attrs: Any) -> Series:
    ds = Dataset()
    ds.Modality = "DX"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Rows, ds.Columns = 64, 48
    ds.PhotometricInterpretation = "MONOCHROME2"
    for k, v in attrs.items():
        setattr(ds, k, v)
    return Series("1.2.3", [Instance(Path("x.dcm"), ds)])


def test_routing_extremity_for_fracture_chest_for_pneumonia() -> None:
    accepts = tf.dicom_ai_block(1.0, 0.5)["accepts"]
    hand, chest = _series(BodyPartExamined="HAND"), _series(BodyPartExamined="CHEST")
    assert routing.not_applicable(accepts, hand) is None and routing.unfit(accepts, hand) is None
    reason = routing.unfit(accepts, chest)
    assert reason is not None and reason.startswith("body part examined is CHEST")
    skull = _series(BodyPartExamined="SKULL")
    assert routing.unfit(accepts, skull) is not None
    assert routing.not_applicable(accepts, _series(Modality="CT")) == "modality CT"
    # The chest model keeps chest films only.
    cxr = CXR_PNEUMONIA.dicom_ai["accepts"]
    assert routing.unfit(cxr, hand) is not None and routing.unfit(cxr, chest) is None
    # Annex L's THORAX is the same concept as CHEST: the chest model reads it, the fracture
    # detector does not.
    thorax = _series(BodyPartExamined="THORAX")
    assert routing.unfit(cxr, thorax) is None and routing.unfit(accepts, thorax) is not None


def test_body_part_site() -> None:
    header = Dataset()
    header.BodyPartExamined = "WRIST"
    assert body_part_site(header) == ("hand", ("74670003", "SCT", "Wrist joint"))
    header.BodyPartExamined = "CHEST"
    assert body_part_site(header) == ("", None)
    # PS3.16 Annex L spells the limbs without spaces; a device's older spelling reads the same.
    header.BodyPartExamined = "LOWERLEG"
    assert body_part_site(header) == ("leg", ("30021000", "SCT", "Lower leg"))
    header.BodyPartExamined = "lower leg "
    assert body_part_site(header) == ("leg", ("30021000", "SCT", "Lower leg"))


@pytest.mark.parametrize("part", ["UPPERARM", "LOWERLEG", "LOWERLIMB", "TIBIAFIBULA", "ACJOINT",
                                  "RADIUS", "SESAMOID"])
def test_annex_l_limb_terms_are_routed_to_the_shipped_detector(part: str) -> None:
    meta = json.loads((REPO / "models" / "xr-fracture" / "configs" / "metadata.json").read_text())
    accepts = meta["dicom_ai"]["accepts"]
    film = _series(BodyPartExamined=part)
    assert routing.not_applicable(accepts, film) is None and routing.unfit(accepts, film) is None
    # Every value the bundle accepts has a finding site, and every site is accepted.
    assert accepts["body_part_examined"] == list(FRACTURE_SITES)


def test_reported_boxes_and_markers() -> None:
    boxes = [Box(0, 0, 1, 1, 0.2), Box(2, 2, 3, 3, 0.5), Box(4, 4, 5, 5, 0.1)]
    rule = BoxRule(max_boxes=5, min_score=0.3, iou_threshold=0.3)
    assert reported_boxes(boxes, False, rule) == []
    assert reported_boxes(boxes, True, rule) == boxes[:2]
    assert reported_boxes(boxes, True, BoxRule(1, 0.0, 0.3)) == boxes[:1]
    # Source 100×200 shown at 50×100: half in both directions, whole pixels covering the box.
    assert display_marker((10.0, 21.0, 31.0, 40.0), (100, 200), (50, 100)) == (10, 5, 20, 16)


def test_fracture_spec_refuses_incomplete_bundles_with_every_problem() -> None:
    block = tf.dicom_ai_block(1.2, 0.4)
    spec = parse_fracture(block)
    assert spec.decision.threshold == pytest.approx(0.4) and spec.temperature == 1.2
    assert spec.boxes.max_boxes == block["boxes"]["max_boxes"]
    for broken, problem in (
            ({**block, "decision": {"kind": "threshold", "label": "fracture"}},
             "decision.threshold"),
            ({**block, "boxes": {}}, "boxes.max_boxes"), ({**block, "codes": {}}, "fracture"),
            ({**block, "image_score": {}}, "image_score.peak_weight"),
            ({**block, "image_score": {"peak_weight": 1.5}}, r"must be in \[0, 1\]"),
            ({**block, "preprocessing": {"size": [256, 256], "aspect": "stretch", "stride": 4}},
             "aspect")):
        with pytest.raises(BundleError, match=problem):
            _validate_block("x", broken)
    assert spec.peak_weight == block["image_score"]["peak_weight"]
    everything = {**block, "boxes": {}, "codes": {}, "temperature": 0, "image_score": None,
                  "preprocessing": {"size": [256], "aspect": "stretch"}}
    with pytest.raises(SpecError) as caught:
        parse_fracture(everything)
    text = "; ".join(caught.value.problems)
    for part in ("boxes.max_boxes", "boxes.min_score", "boxes.iou_threshold", "fracture",
                 "image_score.peak_weight",
                 "temperature must be positive", "preprocessing.size", "aspect", "stride"):
        assert part in text, part


def _tiny_bundle(root: Path, threshold: float, peak_weight: float = 0.5) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    meta = tf.metadata(1.0, threshold, {})
    meta["dicom_ai"]["preprocessing"]["size"] = [32, 32]
    meta["dicom_ai"]["image_score"]["peak_weight"] = peak_weight
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    (root / "configs" / "inference.json").write_text(json.dumps({"network_def": TINY_NET}))
    torch.manual_seed(0)
    net = FractureNet(widths=(4, 4, 4, 4, 4), fpn_channels=4)
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_inference_scores_images_with_the_bundles_peak_weight(tmp_path: Path,
                                                              weight: float) -> None:
    bundle = load_bundle(_tiny_bundle(tmp_path, 0.5, weight), device=torch.device("cpu"))
    x = np.random.default_rng(0).random((3, 1, 32, 32)).astype(np.float32)
    scores, _heats, _sizes = forward(bundle, list(x), batch_size=2)
    with torch.inference_mode():
        logit, heat, _size = bundle.network(torch.from_numpy(x))
    expected = logit[:, 0] if weight == 0.0 else heat[:, 0].amax(dim=(-2, -1))
    np.testing.assert_allclose(scores, expected.double().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threshold", [0.0, 1.01])
def test_analysed_radiograph_findings_json(tmp_path: Path, make_dicom: MakeDicom,
                                           threshold: float) -> None:
    bundle = load_bundle(_tiny_bundle(tmp_path / "bundle", threshold), device=torch.device("cpu"))
    pixels = (np.random.default_rng(0).random((60, 40)) * 255).astype(np.uint8)
    path = make_dicom("dx.dcm", pixels, Modality="DX", BodyPartExamined="HAND",
                      SOPClassUID="1.2.840.10008.5.1.4.1.1.1.1")
    from pydicom import dcmread

    instance = Instance(path, dcmread(path, stop_before_pixels=True))
    series = Series(str(instance.header.SeriesInstanceUID), [instance])
    result, failed = analyse_fracture(bundle, series, datetime(2025, 1, 1),
                                      InferenceSettings())
    assert failed == {} and result.status == "ok"
    doc = result.to_json()["findings"]
    image_level = doc[0]
    assert image_level["label"] == "fracture" and 0.0 <= image_level["probability"] <= 1.0
    assert image_level["positive"] is (threshold == 0.0)
    assert image_level["site"] == {"value": "85562004", "scheme": "SCT", "meaning": "Hand"}
    boxed = [f for f in doc if "bbox_px" in f]
    if threshold > 1.0:
        assert boxed == []
        return
    # A positive image reports at least its top box, inside the 40×60 stored grid.
    assert boxed and all(f["label"] == "fracture" and "probability" in f for f in boxed)
    for f in boxed:
        c0, r0, c1, r1 = f["bbox_px"]
        assert 0 <= c0 < c1 <= 40 and 0 <= r0 < r1 <= 60
        assert f["image_uid"] == instance.SOPInstanceUID
    assert ("multiple_fractures" in [f["label"] for f in doc]) == (len(boxed) > 1)
    assert len(result.explanations) == 1 and len(result.explanations[0].markers) == len(boxed)


def test_shipped_fracture_metadata_is_what_its_recipe_exports() -> None:
    """The bundle's metadata is XR_FRACTURE's, with the fitted numbers it records."""
    path = Path(__file__).resolve().parents[2] / "models" / "xr-fracture" / "configs"
    meta = json.loads((path / "metadata.json").read_text())
    block = meta["dicom_ai"]
    expected = tf.metadata(block["temperature"], block["decision"]["threshold"],
                           meta["eval_metrics"], block["input_fit"]["threshold"])
    # The versions are those of the environment that exported it, not of the one testing it.
    for key in ("pytorch_version", "numpy_version"):
        expected[key] = meta[key]
    assert expected == meta


def test_shipped_fracture_network_is_its_recipes_ensemble() -> None:
    path = Path(__file__).resolve().parents[2] / "models" / "xr-fracture" / "configs"
    config = json.loads((path / "inference.json").read_text())
    assert config["network_def"] == tf.RECIPE.bundle_network_def
    assert len(config["network_def"]["members"]) == tf.RECIPE.members == 4


def test_member_weights_and_records_make_the_ensemble_bundle(tmp_path: Path) -> None:
    def member(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return FractureNet(widths=(4, 4, 4, 4, 4), fpn_channels=4)

    nets = [member(k) for k in range(tf.RECIPE.members)]
    records = [{"loop": {"seed": k}} for k in range(tf.RECIPE.members)]
    with pytest.raises(ValueError, match=f"{tf.RECIPE.members} member"):
        tf.write_weights(tmp_path, nets[:1], records[:1])
    tf.write_weights(tmp_path, nets, records)
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    for k, net in enumerate(nets):
        for key, value in net.state_dict().items():
            assert torch.equal(state[f"members.{k}.{key}"], value)
    assert json.loads((tmp_path / "docs" / "training.json").read_text()) == {
        "recipe": "xr-fracture", "members": records}


def recipe_networks(*seeds: int) -> list[torch.nn.Module]:
    nets = []
    for seed in seeds:
        torch.manual_seed(seed)
        nets.append(build_network(tf.RECIPE.network_def))
    return nets


def test_a_bundle_of_another_member_count_loads_with_its_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An earlier release (or a bundle of further seeds) loads although the recipe's member
    count has changed since: the records say how many networks the weights hold."""
    nets = recipe_networks(0, 1, 2)
    records = [{"loop": {"seed": seed}} for seed in (0, 1, 2)]
    monkeypatch.setattr(tf, "RECIPE", dataclasses.replace(tf.RECIPE, members=3))
    tf.write_weights(tmp_path, nets, records)
    monkeypatch.undo()
    assert tf.RECIPE.members != 3
    loaded = tf.member_networks(tf.load_trained(tmp_path))
    assert tf.training_records(tmp_path) == records
    assert len(loaded) == 3
    for net, back in zip(nets, loaded, strict=True):
        for key, value in net.state_dict().items():
            assert torch.equal(back.state_dict()[key], value)


def test_ensemble_command_refuses_members_of_other_seeds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Members come in seed order from single networks and from ensembles alike."""
    single = tmp_path / "single"
    monkeypatch.setattr(tf, "RECIPE", dataclasses.replace(tf.RECIPE, members=2))
    tf.write_weights(tmp_path / "pair", recipe_networks(0, 1),
                     [{"loop": {"seed": 0}}, {"loop": {"seed": 1}}])
    monkeypatch.undo()
    (single / "models").mkdir(parents=True)
    (single / "docs").mkdir()
    torch.save(recipe_networks(5)[0].state_dict(), single / "models" / "model.pt")
    (single / "docs" / "training.json").write_text(json.dumps({"loop": {"seed": 5}}))
    expected = list(range(tf.RECIPE.members))
    with pytest.raises(SystemExit, match=re.escape(f"seeds [5, 0, 1], the recipe's are "
                                                   f"{expected}")):
        tf.main(["ensemble", str(single), str(tmp_path / "pair"),
                 "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
