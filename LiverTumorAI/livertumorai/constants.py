"""Class and label definitions shared by the engine, the Slicer module and training.

Every value here is part of a contract with files on disk (the weights manifest, the
`.seg.nrrd` output, `slices.csv`), so change them only together with those files.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "SLICE_CLASS_NAMES",
    "SLICE_CLASS_BACKGROUND",
    "SLICE_CLASS_TUMOR",
    "SLICE_CLASS_NO_TUMOR",
    "LABEL_BACKGROUND",
    "LABEL_LIVER",
    "LABEL_TUMOR",
    "SEGMENT_LIVER",
    "SEGMENT_TUMOR",
    "SegmentDefinition",
    "DEFAULT_MIN_LESION_VOLUME_MM3",
    "DEFAULT_TUMOR_THRESHOLD",
    "slice_class_from_labels",
]

# Classifier outputs, in the order of the network's logits.
SLICE_CLASS_BACKGROUND = 0  # no liver in the slice
SLICE_CLASS_TUMOR = 1  # liver with at least one tumor voxel
SLICE_CLASS_NO_TUMOR = 2  # liver without tumor
SLICE_CLASS_NAMES = ("background", "tumor", "no tumor")

# Segmentation label values (LiTS convention: liver is liver tissue outside tumors).
LABEL_BACKGROUND = 0
LABEL_LIVER = 1
LABEL_TUMOR = 2

# Tumor components smaller than this become liver: 65 mm3 is a sphere of 5 mm diameter, the
# smallest lesion the U-Net is trained on (synthetic lesions span 5 to 60 mm). Smaller
# components were mostly false positives on the validation CT.
DEFAULT_MIN_LESION_VOLUME_MM3 = 65.0
# Tumor probability from which a voxel is labelled tumor (softmax output, 0..1).
DEFAULT_TUMOR_THRESHOLD = 0.5
# U-Net slices per batch (the classifier takes twice as many). On the idle 2-core AMX CPU of
# benchmarks/BENCHMARKS.md, with freed memory kept for reuse (livertumorai.runtime), the
# fused U-Net ran 2.79 ms per slice in batches of 16 against 3.10 ms in batches of 8, and
# 32 gave no further gain.
DEFAULT_BATCH_SIZE = 16


@dataclass(frozen=True)
class SegmentDefinition:
    """One segment of the output `.seg.nrrd`, with its Slicer colour and terminology.

    Terminology codes are SNOMED CT, written the way Slicer's `TerminologyEntry` tag
    expects them (scheme designator `SCT`).
    """

    segment_id: str
    name: str
    label_value: int
    color_rgb: tuple[float, float, float]
    category: tuple[str, str]  # (code value, code meaning)
    type: tuple[str, str]
    anatomic_region: tuple[str, str] | None = None

    def terminology_entry(self) -> str:
        """Return the Slicer `TerminologyEntry` string for this segment."""
        context = "Segmentation category and type - 3D Slicer General Anatomy list"
        anatomic_context = "Anatomic codes - DICOM master list"
        category = f"SCT^{self.category[0]}^{self.category[1]}"
        type_ = f"SCT^{self.type[0]}^{self.type[1]}"
        region = (
            f"SCT^{self.anatomic_region[0]}^{self.anatomic_region[1]}"
            if self.anatomic_region
            else "^^"
        )
        return f"{context}~{category}~{type_}~^^~{anatomic_context}~{region}~^^"


# Colours are those of Slicer's General Anatomy terminology (liver: 221,130,101).
SEGMENT_LIVER = SegmentDefinition(
    segment_id="liver",
    name="Liver",
    label_value=LABEL_LIVER,
    color_rgb=(221 / 255, 130 / 255, 101 / 255),
    category=("123037004", "Anatomical Structure"),
    type=("10200004", "Liver"),
)
SEGMENT_TUMOR = SegmentDefinition(
    segment_id="liver_tumor",
    name="Liver tumor",
    label_value=LABEL_TUMOR,
    color_rgb=(144 / 255, 238 / 255, 144 / 255),
    category=("49755003", "Morphologically Altered Structure"),
    type=("108369006", "Neoplasm"),
    anatomic_region=("10200004", "Liver"),
)


def slice_class_from_labels(has_liver: bool, has_tumor: bool) -> int:
    """Return a slice's reference class: tumor beats liver, liver beats background."""
    if has_tumor:
        return SLICE_CLASS_TUMOR
    if has_liver:
        return SLICE_CLASS_NO_TUMOR
    return SLICE_CLASS_BACKGROUND
