"""Draw synthetic liver tumors beside the real tumors of case ircadb1.17, at one CT window.

Rows of the figure, each panel an axial 100 mm square centred on a lesion, at the
segmentation network's window (`DEFAULT_PREPROCESSING` of training/lit_model.py, 40/400 HU):

1. real tumors of ircadb1.17 (two slices through each of its two tumors);
2. and 3. synthetic tumors from `insert_tumors` in the healthy livers of ircadb1.7 and
   chaos_ct3, at full resolution, smallest to largest;
4. training samples of ircadb1.7 after `SyntheticTumorTransform`, at the network's input
   resolution (2 mm pixels), centre channel, with the label-2 outline in red.

Panels are shown in the image orientation of the engine's axial stack (anterior up,
patient right on the left). The input data folder is read only.

Usage::

    python training/make_synthetic_tumor_figure.py --data-dir ../shared/data/train
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402

from livertumorai.constants import LABEL_LIVER, LABEL_TUMOR  # noqa: E402
from livertumorai.preprocess import SlicePreprocessor  # noqa: E402
from training.dataset import read_axial_ct  # noqa: E402
from training.lit_model import DEFAULT_PREPROCESSING  # noqa: E402
from training.synthetic_tumors import (  # noqa: E402
    CaseGeometry,
    SyntheticTumorConfig,
    SyntheticTumorTransform,
    insert_tumors,
)

logger = logging.getLogger("training.make_synthetic_tumor_figure")

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPOSITORY_ROOT.parent / "shared" / "data" / "train"
DEFAULT_OUTPUT = REPOSITORY_ROOT / "training" / "synthetic_tumors.png"
REAL_CASE = "ircadb1.17"
HEALTHY_CASES = ("ircadb1.7", "chaos_ct3")
PANEL_SIZE_MM = 100.0
PANELS_PER_ROW = 4


@dataclasses.dataclass
class Panel:
    """One axial crop: image (rows, columns) with its pixel size and an optional outline."""

    image: np.ndarray
    pixel_mm: tuple[float, float]
    title: str
    outline: np.ndarray | None = None


def read_case(data_dir: Path, case_id: str) -> tuple[np.ndarray, np.ndarray, tuple, tuple]:
    """Return the axial stack in HU, its labels, spacing (slice, row, column) in mm and the
    body centre (row, column) that the engine crops around."""
    ct = read_axial_ct(data_dir / case_id / "ct.nii.gz")
    label_image = sitk.ReadImage(str(data_dir / case_id / "label.nii.gz"))
    labels = ct.frame.to_axial(sitk.GetArrayFromImage(label_image))
    # stack_hu is a view of the SimpleITK image's buffer, freed with `ct`: copy it.
    return (np.array(ct.stack_hu, dtype=np.float32), np.ascontiguousarray(labels),
            tuple(ct.frame.spacing_mm), ct.center_rc)


def crop_panel(stack: np.ndarray, slice_index: int, centre_rc: tuple[float, float],
               spacing_mm: tuple, fill: float) -> np.ndarray:
    """Return a PANEL_SIZE_MM square of one slice about `centre_rc`, padded with `fill`."""
    half = [int(round(PANEL_SIZE_MM / 2.0 / s)) for s in spacing_mm[1:]]
    padded = np.pad(stack[slice_index], ((half[0], half[0]), (half[1], half[1])),
                    constant_values=fill)
    row, col = (int(round(c)) + h for c, h in zip(centre_rc, half))
    return padded[row - half[0]: row + half[0], col - half[1]: col + half[1]]


def real_panels(data_dir: Path) -> list[Panel]:
    """Return two panels per real tumor: its largest cross-section and a smaller one."""
    stack, labels, spacing, _ = read_case(data_dir, REAL_CASE)
    components, count = ndimage.label(labels == LABEL_TUMOR)
    panels = []
    for tumor in range(1, count + 1):
        areas = (components == tumor).sum(axis=(1, 2))
        largest = int(np.argmax(areas))
        slices = np.flatnonzero(areas)
        smaller = int(slices[int(0.85 * (len(slices) - 1))])
        for slice_index in (largest, smaller):
            rows, cols = np.nonzero(components[slice_index] == tumor)
            centre = (float(rows.mean()), float(cols.mean()))
            panels.append(Panel(crop_panel(stack, slice_index, centre, spacing, -1000.0),
                                spacing[1:], f"real {REAL_CASE} tumor {tumor}, "
                                f"slice {slice_index}"))
    return panels[:PANELS_PER_ROW]


def synthetic_panels(data_dir: Path, case_id: str, seed: int) -> list[Panel]:
    """Insert lesions into a healthy liver and return panels of four, smallest to largest."""
    stack, labels, spacing, _ = read_case(data_dir, case_id)
    config = SyntheticTumorConfig(count_range=(8, 8))
    ct, _, lesions = insert_tumors(stack, labels, spacing, np.random.default_rng(seed), config)
    lesions = sorted(lesions, key=lambda lesion: lesion.diameter_mm)
    chosen = [lesions[int(round(q * (len(lesions) - 1)))]
              for q in np.linspace(0.0, 1.0, PANELS_PER_ROW)] if lesions else []
    panels = []
    for lesion in chosen:
        slice_index, row, col = lesion.center_index
        panels.append(Panel(crop_panel(ct, slice_index, (row, col), spacing, -1000.0),
                            spacing[1:], f"synthetic in {case_id}: {lesion.diameter_mm:.0f} mm, "
                            f"{lesion.contrast_hu:+.0f} HU"))
    return panels


def transform_panels(data_dir: Path, case_id: str, seed: int) -> list[Panel]:
    """Apply the training transform to network-resolution samples and crop around lesions."""
    stack, labels, spacing, center_rc = read_case(data_dir, case_id)
    preprocessing = DEFAULT_PREPROCESSING["segmentation"]
    context = SlicePreprocessor(preprocessing, stack.shape, spacing, center_rc)
    single = SlicePreprocessor(dataclasses.replace(preprocessing, context_slices=0),
                               stack.shape, spacing, center_rc)
    geometry = CaseGeometry(
        pixel_spacing_mm=(preprocessing.in_plane_spacing_mm,) * 2,
        slice_spacing_mm=float(spacing[0]),
        context_offsets=tuple(int(v) for v in context.context_offsets),
        window_center_hu=preprocessing.window_center_hu,
        window_width_hu=preprocessing.window_width_hu,
        num_slices=stack.shape[0],
    )
    transform = SyntheticTumorTransform(SyntheticTumorConfig(), geometry)
    rng = np.random.default_rng(seed)
    liver_slices = np.flatnonzero((labels == LABEL_LIVER).any(axis=(1, 2)))
    pixel_mm = (preprocessing.in_plane_spacing_mm,) * 2
    centre_channel = preprocessing.context_slices

    panels = []
    for slice_index in np.quantile(liver_slices, [0.3, 0.45, 0.6, 0.75]).astype(int):
        image = context.images(stack, [int(slice_index)])[0]
        mask = single.labels(labels, [int(slice_index)])[0]
        image, mask = transform.apply(image, mask, case_id, int(slice_index), rng)
        tumor = mask.numpy() == LABEL_TUMOR
        if not tumor.any():
            continue
        components, _ = ndimage.label(tumor)
        rows, cols = np.nonzero(components == 1)
        unit = image[centre_channel].numpy()[None]
        centre = (float(rows.mean()), float(cols.mean()))
        hu = unit * preprocessing.window_width_hu + (preprocessing.window_center_hu
                                                      - preprocessing.window_width_hu / 2.0)
        crop_spacing = (1.0,) + pixel_mm
        panels.append(Panel(crop_panel(hu, 0, centre, crop_spacing, -1000.0), pixel_mm,
                            f"transform, {case_id} slice {slice_index}, 2 mm pixels",
                            crop_panel(tumor[None].astype(float), 0, centre, crop_spacing,
                                       0.0)))
    return panels


def draw(rows: list[tuple[str, list[Panel]]], window: tuple[float, float], output: Path) -> None:
    """Draw the panel rows at one window and write the PNG."""
    low = window[0] - window[1] / 2.0
    high = window[0] + window[1] / 2.0
    figure, axes = plt.subplots(len(rows), PANELS_PER_ROW, figsize=(3.2 * PANELS_PER_ROW,
                                                                     3.4 * len(rows)))
    for row_axes, (row_title, panels) in zip(axes, rows):
        row_axes[0].set_ylabel(row_title, fontsize=10)
        for ax, panel in zip(row_axes, panels + [None] * (PANELS_PER_ROW - len(panels))):
            ax.set_xticks([])
            ax.set_yticks([])
            if panel is None:
                continue
            height_mm = panel.image.shape[0] * panel.pixel_mm[0]
            width_mm = panel.image.shape[1] * panel.pixel_mm[1]
            extent = (0.0, width_mm, height_mm, 0.0)
            ax.imshow(panel.image, cmap="gray", vmin=low, vmax=high, extent=extent,
                      interpolation="nearest")
            if panel.outline is not None:
                rows_mm = (np.arange(panel.outline.shape[0]) + 0.5) * panel.pixel_mm[0]
                cols_mm = (np.arange(panel.outline.shape[1]) + 0.5) * panel.pixel_mm[1]
                ax.contour(cols_mm, rows_mm, panel.outline, levels=[0.5], colors="red",
                           linewidths=0.8)
            ax.set_title(panel.title, fontsize=7)
    figure.suptitle(f"Real and synthetic liver tumors, window {window[0]:.0f}/{window[1]:.0f} "
                    f"HU, {PANEL_SIZE_MM:.0f} mm panels", fontsize=11)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help=f"folder containing the case folders {REAL_CASE} and "
                             f"{', '.join(HEALTHY_CASES)} (ct.nii.gz, label.nii.gz)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="PNG to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic lesions")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    missing = [case for case in (REAL_CASE,) + HEALTHY_CASES
               if not (args.data_dir / case / "ct.nii.gz").is_file()]
    if missing:
        logger.error("cases %s not found in %s; pass --data-dir", missing, args.data_dir)
        return 2
    torch.manual_seed(args.seed)

    preprocessing = DEFAULT_PREPROCESSING["segmentation"]
    window = (preprocessing.window_center_hu, preprocessing.window_width_hu)
    rows = [(f"real ({REAL_CASE})", real_panels(args.data_dir))]
    for offset, case_id in enumerate(HEALTHY_CASES):
        rows.append((f"synthetic ({case_id})",
                     synthetic_panels(args.data_dir, case_id, args.seed + offset)))
    rows.append(("training transform", transform_panels(args.data_dir, HEALTHY_CASES[0],
                                                         args.seed)))
    draw(rows, window, args.output)
    logger.info("Wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
