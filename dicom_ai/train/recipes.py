"""What each shipped model is: network, input size, data, augmentation, optimisation, and the
routing/coding metadata written into its bundle.

Candidates were timed for one training step on this 2-core CPU (batch 32, ms per image, idle
machine, 2 threads): ResNet-18 (widths 32–256) 24 at 128 px / 114 at 224 px; ResNet-10 24 / 62;
a slim DenseNet (growth 16, blocks 4-8-12-8) 10 at 128 px, 15 at 160 px, 33 at 224 px. On the
CPU shared with other jobs a 160 px epoch of the slim DenseNet took 7.3 min (val AUC 0.974
after one epoch), so the shipped recipe trains it at 128 px for at most 20 epochs or 65
minutes. For 28 px fundus images a ResNet-10 without the stride-2 stem keeps a 4×4 map before
pooling (2 ms per image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dicom_ai.inference.ensemble import member_layer
from dicom_ai.inference.fracture_net import STRIDE
from dicom_ai.results.codes import FRACTURE_SITES, MULTIPLE_FRACTURES
from dicom_ai.train.augment import CXR, DERMOSCOPY, FUNDUS, AugmentConfig
from dicom_ai.train.datasets import CXR_LABELS, DERM_LABELS, FUNDUS_LABELS
from dicom_ai.train.loop import LoopConfig


@dataclass(frozen=True)
class WarmStart:
    """Weights a recipe starts from instead of a random initialisation (transfer from a model
    trained on our own images), named by their SHA-256 so a run cannot start from others."""

    sha256: str
    #: Where the weights are kept: the git revision that committed them and their path there.
    revision: str
    path: str

    @property
    def source(self) -> str:
        """How to get the weights: ``git show REVISION:PATH``."""
        return f"git show {self.revision}:{self.path}"


@dataclass(frozen=True)
class Recipe:
    """Everything needed to train and package one model."""

    name: str
    description: str
    network_def: dict[str, Any]
    size: tuple[int, int]
    labels: tuple[str, ...]
    augment: AugmentConfig
    loop: LoopConfig
    #: Layer of the Grad-CAM explanation; None where the task explains itself otherwise (the
    #: fracture detector shows its heatmap).
    gradcam_layer: str | None
    feature_layers: tuple[str, ...]
    #: The bundle's ``dicom_ai`` block less what is fitted after training (temperature,
    #: thresholds, input-fit statistics).
    dicom_ai: dict[str, Any]
    warm_start: WarmStart | None = None
    #: Bundle version written to ``metadata.json``, and what each version changed.
    version: str = "1.0.0"
    changelog: tuple[tuple[str, str], ...] = (("1.0.0", "first release"),)
    #: Trainings of ``network_def`` from seeds ``loop.seed`` … ``loop.seed + members - 1``
    #: whose logits the bundle averages (:class:`~dicom_ai.inference.ensemble.LogitEnsemble`);
    #: 1: the network alone.
    members: int = 1

    def __post_init__(self) -> None:
        if self.members < 1:
            raise ValueError(f"{self.name}: members must be at least 1, got {self.members}")

    @property
    def member_seeds(self) -> tuple[int, ...]:
        """The seeds of the bundle's members, in order: ``loop.seed`` … ``loop.seed +
        members - 1``."""
        return tuple(self.loop.seed + k for k in range(self.members))

    @property
    def bundle_network_def(self) -> dict[str, Any]:
        """The network of ``configs/inference.json``: ``network_def``, or the ensemble of
        ``members`` of it."""
        if self.members == 1:
            return self.network_def
        return {"_target_": "dicom_ai.inference.ensemble.LogitEnsemble",
                "members": [self.network_def] * self.members}

    def bundle_imports(self, network_import: str) -> list[str]:
        """``imports`` of ``configs/inference.json``: ``network_import`` (what builds
        ``network_def``) and, for an ensemble, the ensemble's module."""
        return [network_import] + (["$import dicom_ai.inference.ensemble"]
                                   if self.members > 1 else [])

    def _bundle_layer(self, layer: str, member: int) -> str:
        """``layer`` of ``member`` as the bundle's network names it."""
        return layer if self.members == 1 else member_layer(layer, member)

    @property
    def bundle_gradcam_layers(self) -> tuple[str, ...]:
        """The layers whose Grad-CAM maps the bundle sums: one per member."""
        if self.gradcam_layer is None:
            return ()
        return tuple(self._bundle_layer(self.gradcam_layer, k) for k in range(self.members))

    @property
    def bundle_feature_layers(self) -> tuple[str, ...]:
        """The input-fit layers in the bundle's network. Of an ensemble, the first member's:
        every member saw the same training images, and the members' features together would
        need ``members``² times the covariance entries from those same images."""
        return tuple(self._bundle_layer(layer, 0) for layer in self.feature_layers)


CXR_PNEUMONIA = Recipe(
    name="cxr-pneumonia",
    description="Pneumonia vs normal on frontal pediatric chest radiographs (CR/DX)",
    network_def={"_target_": "monai.networks.nets.DenseNet", "spatial_dims": 2,
                 "in_channels": 1, "out_channels": 2, "init_features": 32, "growth_rate": 16,
                 "block_config": [4, 8, 12, 8], "dropout_prob": 0.0},
    size=(128, 128),
    labels=CXR_LABELS,
    augment=CXR,
    loop=LoopConfig(epochs=20, batch_size=32, lr=2e-3, weight_decay=1e-4, patience=6,
                    max_minutes=65.0),
    gradcam_layer="class_layers.relu",
    feature_layers=("features.transition1", "features.transition2", "features.transition3",
                    "class_layers.relu"),
    dicom_ai={
        "task": "classification",
        "input": "xray",
        "intended_input": "frontal chest radiographs",
        "accepts": {
            "modality": ["CR", "DX"],
            "photometric_interpretation": ["MONOCHROME1", "MONOCHROME2"],
            # PS3.16 Annex L defines both terms, for the same SNOMED CT concept.
            "body_part_examined": ["CHEST", "THORAX"],
            "reject_view_position": ["LL", "RL", "LATERAL", "LAT"],
            "reject_image_type": ["LOCALIZER"],
        },
        "preprocessing": {"size": [128, 128], "aspect": "stretch"},
        "decision": {"kind": "threshold", "label": "pneumonia",
                     "criterion": "highest threshold with sensitivity >= 0.95 on validation"},
        "derived_findings": [],
        "codes": {
            "normal": {"value": "17621005", "scheme": "SCT", "meaning": "Normal"},
            "pneumonia": {"value": "233604007", "scheme": "SCT", "meaning": "Pneumonia"},
        },
        "finding_site": {"value": "39607008", "scheme": "SCT", "meaning": "Lung structure"},
    },
    version="1.0.1",
    changelog=(("1.0.1", "accepts Body Part Examined THORAX as well as CHEST (same weights and "
                         "calibration)"),
               ("1.0.0", "first release")),
)

FUNDUS_DR = Recipe(
    name="fundus-dr",
    description="Diabetic retinopathy grade 0-4 (ICDR) on colour fundus photographs",
    network_def={"_target_": "monai.networks.nets.ResNet", "block": "basic",
                 "layers": [1, 1, 1, 1], "block_inplanes": [32, 64, 128, 256],
                 "spatial_dims": 2, "n_input_channels": 3, "num_classes": 5,
                 "conv1_t_size": 3, "conv1_t_stride": 1, "no_max_pool": True},
    size=(28, 28),
    labels=FUNDUS_LABELS,
    augment=FUNDUS,
    loop=LoopConfig(epochs=40, batch_size=32, lr=2e-3, weight_decay=5e-4, patience=20,
                    max_minutes=15.0, label_smoothing=0.05, class_weight_power=0.5),
    # scripts/experiments/fundus_selection_rules.py: on validation halves no choice was made
    # on, the mean logits of 4 seeds' best epochs scored 0.013 above one seed's (higher on 98 %
    # of the halves); 8 seeds added nothing more.
    members=4,
    version="1.1.0",
    changelog=(("1.1.0", "an ensemble of the recipe trained from seeds 0-3, logits averaged; "
                         "Grad-CAM the sum of the members' maps"),
               ("1.0.0", "first release")),
    gradcam_layer="layer4",
    feature_layers=("layer1", "layer2", "layer3", "layer4"),
    dicom_ai={
        "task": "classification",
        "input": "fundus",
        "intended_input": "colour fundus photographs",
        "accepts": {
            # Ophthalmic Photography 8/16 bit, VL Photographic, Secondary Capture (a fundus
            # photo exported from a camera workstation often arrives as SC or OT).
            "modality": ["OP", "XC", "OT", "SC"],
            "sop_class_uid": ["1.2.840.10008.5.1.4.1.1.77.1.5.1",
                              "1.2.840.10008.5.1.4.1.1.77.1.5.2",
                              "1.2.840.10008.5.1.4.1.1.77.1.4",
                              "1.2.840.10008.5.1.4.1.1.7"],
            "photometric_interpretation": ["RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR"],
            # A VL Photographic image of the skin (dermoscopy) is not a fundus: the eye by
            # body part, CID 4209 Ophthalmic Anatomic Structure Imaged by anatomic region.
            "body_part_examined": ["EYE"],
            "anatomic_region": ["CID4209"],
            "reject_image_type": ["LOCALIZER"],
        },
        "preprocessing": {"size": [28, 28], "aspect": "pad", "fov_crop": True},
        "decision": {"kind": "argmax"},
        "derived_findings": [{"label": "referable_dr",
                              "sum_of": ["dr_grade_2", "dr_grade_3", "dr_grade_4"],
                              "criterion": "Youden's J maximum on validation"}],
        # SNOMED CT concepts of the CMS "Level of Severity of Retinopathy Findings" value set
        # (OID 2.16.840.1.113883.3.526.3.1283) and their parent 4855003; grade 0 has no
        # disorder concept, so it is coded "Normal" at the retina like a normal chest film.
        "codes": {
            "dr_grade_0": {"value": "17621005", "scheme": "SCT", "meaning": "Normal"},
            "dr_grade_1": {"value": "312903003", "scheme": "SCT",
                           "meaning": "Mild nonproliferative retinopathy due to diabetes mellitus"},
            "dr_grade_2": {"value": "312904009", "scheme": "SCT",
                           "meaning": "Moderate nonproliferative retinopathy due to diabetes "
                                      "mellitus"},
            "dr_grade_3": {"value": "312905005", "scheme": "SCT",
                           "meaning": "Severe nonproliferative retinopathy due to diabetes "
                                      "mellitus"},
            "dr_grade_4": {"value": "59276001", "scheme": "SCT",
                           "meaning": "Proliferative retinopathy due to diabetes mellitus"},
            "referable_dr": {"value": "4855003", "scheme": "SCT",
                             "meaning": "Diabetic retinopathy"},
        },
        "finding_site": {"value": "5665001", "scheme": "SCT", "meaning": "Retina structure"},
    },
)

DERM_LESION = Recipe(
    name="derm-lesion",
    description="Melanoma, nevus or seborrheic keratosis on dermoscopic images",
    network_def={"_target_": "monai.networks.nets.DenseNet", "spatial_dims": 2,
                 "in_channels": 3, "out_channels": 3, "init_features": 32, "growth_rate": 16,
                 "block_config": [4, 8, 12, 8], "dropout_prob": 0.0},
    size=(192, 192),
    labels=DERM_LABELS,
    augment=DERMOSCOPY,
    # 1.3.0: a fourth cosine cycle, at 192 px, from the 1.2.0 weights (1.2.0: a third cycle at
    # 160 px from 1.1.0, 40 epochs; 1.1.0: a second cycle at 128 px from 1.0.0, lr 1e-3, 60 min;
    # 1.0.0: from scratch, lr 2e-3, 40 epochs, 52 min, patience 10, epoch chosen on macro AUC).
    # The DenseNet pools globally, so weights trained at one size run at the next; lesion
    # texture (pigment network, globules) is what a small input blurs.
    # The epoch is chosen on the ISIC score (melanoma + SK). Patience equals the epochs: the
    # score swings by 0.1 between epochs at a high learning rate, so an early stop would end a
    # cycle before it anneals.
    loop=LoopConfig(epochs=40, batch_size=32, lr=1e-3, weight_decay=1e-4,
                    patience=40, max_minutes=75.0, label_smoothing=0.05,
                    select_classes=(DERM_LABELS.index("melanoma"),
                                    DERM_LABELS.index("seborrheic_keratosis"))),
    gradcam_layer="class_layers.relu",
    feature_layers=("features.transition1", "features.transition2", "features.transition3",
                    "class_layers.relu"),
    dicom_ai={
        "task": "classification",
        "input": "dermoscopy",
        "intended_input": "dermoscopic images of a single skin lesion",
        "accepts": {
            # Dermoscopic Photography (modality DMS), and VL Photographic (XC) when its Body
            # Part Examined or Anatomic Region says skin: a camera with a dermatoscope
            # attached may export VL Photographic, and so may a fundus camera. Anatomic
            # regions: CID 4029 Dermatology Anatomic Site, less the eye structures of CID 4209
            # that it also lists (retina, cornea, iris, sclera).
            "modality": ["DMS", "XC"],
            "sop_class_uid": ["1.2.840.10008.5.1.4.1.1.77.1.7",
                              "1.2.840.10008.5.1.4.1.1.77.1.4"],
            "photometric_interpretation": ["RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT",
                                           "YBR_RCT"],
            "anatomic_region": ["CID4029"],
            "reject_anatomic_region": ["CID4209"],
            "require_anatomy": {"sop_class_uid": ["1.2.840.10008.5.1.4.1.1.77.1.4"],
                                "body_part_examined": ["SKIN"]},
            "reject_image_type": ["LOCALIZER"],
        },
        "preprocessing": {"size": [192, 192], "aspect": "stretch",
                          "colour_constancy": "shades_of_gray_p6"},
        # The most probable diagnosis, and malignant/benign from p(melanoma) at an operating
        # point that keeps melanoma sensitivity >= 0.90 on validation.
        "decision": {"kind": "argmax"},
        "derived_findings": [{"label": "malignant", "sum_of": ["melanoma"],
                              "min_sensitivity": 0.90,
                              "criterion": "highest threshold with melanoma sensitivity >= 0.90 "
                                           "on validation"}],
        # The ISIC 2017 challenge's score: the mean of the melanoma and SK one-vs-rest AUCs.
        "mean_auc_of": ["melanoma", "seborrheic_keratosis"],
        # Melanoma and "Malignant" as DICOM PS3.16 lists them (pydicom's concept dictionary);
        # melanocytic nevus from the SNOMED CT International browser. Seborrheic keratosis is
        # in neither PS3.16 nor pydicom: 394726009 is the concept OHDSI's vocabulary
        # (OHDSI/Vocabulary-v5.0) maps ICD-10 L82 to, as does a code list built by checking
        # each SNOMED CT code against tx.fhir.org.
        "codes": {
            "melanoma": {"value": "1162635006", "scheme": "SCT", "meaning": "Malignant melanoma"},
            "nevus": {"value": "400096001", "scheme": "SCT", "meaning": "Melanocytic nevus"},
            "seborrheic_keratosis": {"value": "394726009", "scheme": "SCT",
                                     "meaning": "Seborrheic keratosis"},
            "malignant": {"value": "21594007", "scheme": "SCT", "meaning": "Malignant"},
        },
        "finding_site": {"value": "39937001", "scheme": "SCT", "meaning": "Skin structure"},
    },
    warm_start=WarmStart(
        sha256="5ea8b002775873d931d2937731143156925a403d4dacb347a0d9d3564b084767",
        revision="b29eeca", path="models/derm-lesion/models/model.pt"),
    version="1.3.1",
    changelog=(("1.3.1", "seborrheic keratosis coded in SNOMED CT (394726009) instead of "
                         "ICD-10 (L82); same weights"),
               ("1.3.0", "a fourth cosine cycle at 192 px from the 1.2.0 weights (40 epochs, 60 "
                         "min on 2 CPU threads; the best on validation was its first epoch)"),
               ("1.2.0", "a third cosine cycle at 160 px from the 1.1.0 weights (40 epochs, 33 "
                         "min on 2 CPU threads)"),
               ("1.1.0", "a second cosine cycle (60 min) from the 1.0.0 weights, epoch chosen "
                         "on the mean melanoma + seborrheic keratosis AUC"),
               ("1.0.0", "first release")),
)

#: Body Part Examined values of the limbs and joints the fracture detector reads: those it
#: knows a finding site for.
FRACTURE_BODY_PARTS = list(FRACTURE_SITES)
#: Operating point of the fracture detector's image-level decision.
FRACTURE_MIN_SENSITIVITY = 0.90
#: Further boxes (beyond the top one) are reported at or above this heatmap peak probability.
#: From scripts/experiments/fracture_box_rule.py on valid with 1.2.0: at 0.4 all 4 further
#: boxes hit a radiologist's box and 2 of the 3 "multiple fractures" calls were right; at
#: 0.3 (the 1.0 value) 6 of 12 hit and 3 of 9 calls were right.
FRACTURE_BOX_SCORE = 0.4

#: The heatmap peak's share of the bundle's image score (fracture_net.image_score), chosen as
#: the plain mean before measuring (not tuned on valid). scripts/experiments/
#: fracture_image_score.py, validation AUC of the classifier alone → the mean: seed 0 0.808 →
#: 0.821, seed 1 0.812 → 0.819, both members averaged 0.821 → 0.836 (paired difference +0.015,
#: 95 % CI +0.003 to +0.029). The peak alone is worse for seed 1 (0.794), and after the 22
#: epochs of 1.0.x it was far behind (0.667 against 0.754): a weight for networks trained to
#: the end of the schedule, which is why the bundle names it.
FRACTURE_PEAK_WEIGHT = 0.5

#: Trained by :mod:`dicom_ai.train.fracture` (its own loop: image BCE + centre heatmap + box
#: size, which reads ``epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``max_minutes`` and
#: ``seed`` of ``loop``), not by :func:`dicom_ai.train.run.train_model`.
XR_FRACTURE = Recipe(
    name="xr-fracture",
    description="Fracture detection (image-level probability and boxes) on musculoskeletal "
                "radiographs (CR/DX)",
    network_def={"_target_": "dicom_ai.inference.fracture_net.FractureNet", "in_channels": 1,
                 "widths": [24, 32, 64, 128, 192], "fpn_channels": 64, "dropout": 0.2},
    size=(256, 256),
    labels=("fracture",),
    # Limb radiographs arrive in any orientation and either side: flips are label-preserving.
    augment=AugmentConfig(rotate_deg=15.0, scale=(0.85, 1.15), translate=0.05, hflip=True,
                          vflip=True, brightness=0.08, contrast=(0.8, 1.2), gamma=(0.75, 1.3)),
    # Seeds 0 and 1 were trained on an H200 (scripts/train_gpu.sh) side by side: 157 and 153
    # epochs in 5.5 min each, where the time budget ended the cosine (progress =
    # max(epoch / 200, time / budget)), i.e. about this schedule of 157 epochs. Seeds 2 and 3
    # ran this schedule on 2 CPU threads of the development VM: 39 min a member (14-16 s an
    # epoch); 1.0.x was one network cut at epoch 22 by a 65-min CPU budget on a slower VM.
    # Same 22 epochs on the GPU: AUC 0.756 against the CPU's 0.740, top-box hit 0.463 against
    # 0.439 (within their CIs). Validation AUC / top-box hit with the classifier alone: seed 0
    # 0.808 / 0.683, seed 1 0.812 / 0.658, seeds 0-1 averaged 0.821 / 0.707 (paired gain over
    # seed 0: AUC +0.013, 95 % CI -0.008 to +0.034; scripts/experiments/fracture_ensemble_gain.py).
    # With the image score: GPU pair 0.836 / 0.707, CPU pair 0.826 / 0.683, all four 0.838 /
    # 0.720 (scripts/experiments/fracture_more_members.py, its rule fixed before the run).
    # A second cosine cycle from 1.0.0 (lr 1e-3, 40 min, as derm-lesion 1.1.0 got) was tried
    # and not shipped: validation AUC 0.734 (0.653-0.809) against 0.740.
    loop=LoopConfig(epochs=157, batch_size=16, lr=2e-3, weight_decay=1e-4, max_minutes=600.0),
    gradcam_layer=None,
    feature_layers=("stages.0", "stages.1", "stages.2", "stages.3"),
    members=4,
    dicom_ai={
        "task": "xr-fracture",
        "input": "xray",
        "intended_input": "radiographs of hand, wrist, arm, shoulder, hip, leg, ankle or foot",
        "accepts": {
            "modality": ["CR", "DX"],
            "sop_class_uid": ["1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1",
                              "1.2.840.10008.5.1.4.1.1.1.1.1"],
            "photometric_interpretation": ["MONOCHROME1", "MONOCHROME2"],
            "body_part_examined": FRACTURE_BODY_PARTS,
            "reject_image_type": ["LOCALIZER"],
        },
        "preprocessing": {"size": [256, 256], "aspect": "pad", "stride": STRIDE},
        "labels": ["fracture"],
        "decision": {"kind": "threshold", "label": "fracture",
                     "criterion": f"highest threshold with sensitivity >= "
                                  f"{FRACTURE_MIN_SENSITIVITY:g} on the FracAtlas valid split"},
        "image_score": {"peak_weight": FRACTURE_PEAK_WEIGHT,
                        "criterion": "the mean of the image logit and the highest centre-heatmap "
                                     "logit"},
        "boxes": {"max_boxes": 5, "min_score": FRACTURE_BOX_SCORE, "iou_threshold": 0.3,
                  "criterion": "the top heatmap peak of a positive image, plus further peaks "
                               f"with probability >= {FRACTURE_BOX_SCORE:g}"},
        # SNOMED CT 125605004 "Fracture of bone" (the root of the fracture disorders);
        # "multiple_fractures" has no verified SNOMED CT code: a private one
        # (dicom_ai.results.codes.MULTIPLE_FRACTURES says why).
        "codes": {"fracture": {"value": "125605004", "scheme": "SCT",
                               "meaning": "Fracture of bone"},
                  "multiple_fractures": dict(MULTIPLE_FRACTURES)},
        "finding_site": {"value": "66019005", "scheme": "SCT", "meaning": "Extremity"},
    },
    version="1.4.0",
    changelog=(("1.4.0", "four networks (seeds 0-3; 2 and 3 trained on the CPU), outputs "
                         "averaged, recalibrated: validation AUC 0.838 (was 0.836), top box on "
                         "a radiologist's box 0.720 (0.707)"),
               ("1.3.1", "accepts the PS3.16 Annex L body-part terms of the limbs it did not "
                         "know (UPPERARM, LOWERLEG, LOWERLIMB, RADIUS, TIBIAFIBULA, ACJOINT …) "
                         "with their finding sites (same weights and calibration)"),
               ("1.3.0", "image score = mean of the image logit and the highest heatmap logit "
                         "(same weights), recalibrated: validation AUC 0.836 (was 0.821), ECE "
                         "0.042 (0.057); specificity at sensitivity 0.90 0.42 (0.47)"),
               ("1.2.0", "two networks of 1.1.0's schedule (seeds 0 and 1), their outputs "
                         "averaged: validation AUC 0.821, top box on a radiologist's box 0.707; "
                         "further boxes from a heatmap score of 0.4 (was 0.3)"),
               ("1.1.0", "the full schedule (157 epochs) on a GPU instead of 22 epochs cut by "
                         "the CPU's time budget: validation AUC 0.808 against 0.740, top box "
                         "on a radiologist's box 0.683 against 0.439"),
               ("1.0.1", 'codes: multiple_fractures as the private code 99DICOMAI MULTFX '
                         '"Multiple fractures" (same weights)'),
               ("1.0.0", "first release")),
)

#: The classification recipes :func:`dicom_ai.train.run.train_model` trains.
RECIPES = {r.name: r for r in (CXR_PNEUMONIA, FUNDUS_DR, DERM_LESION)}
