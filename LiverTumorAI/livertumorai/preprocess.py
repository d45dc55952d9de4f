"""Preparation of axial slices for the networks, and the way back.

Works on an axial stack (slice, row, column) in HU as `geometry.AxialFrame.to_axial` gives
it. For one model's `Preprocessing` block it gathers each slice with its context slices
(2.5-D channels) and maps the HU window to [0, 1]. Rows and columns are then resampled to
the model's pixel size and cropped or padded to its input size around the body's centre. `restore` maps
network outputs back onto the stack's rows and columns. Training uses the same class, so
the networks see identical inputs in training and inference.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .weights import Preprocessing

logger = logging.getLogger(__name__)

__all__ = ["BODY_THRESHOLD_HU", "SlicePreprocessor", "body_center_rc", "window_to_unit"]

# Voxels above this are taken as patient (or table) when centring the crop: air is about
# -1000 HU, lung about -800, fat about -100.
BODY_THRESHOLD_HU = -500.0
_BODY_SEARCH_STEP = 4  # voxels skipped per axis when locating the body (speed only)


def window_to_unit(hu: torch.Tensor, center_hu: float, width_hu: float,
                   inplace: bool = False) -> torch.Tensor:
    """Map an HU window linearly to [0, 1], clipping values outside it.

    With `inplace` the result overwrites `hu`, which saves two full-size temporaries.
    """
    low = center_hu - width_hu / 2.0
    out = hu if inplace else hu.clone()
    return out.sub_(low).div_(width_hu).clamp_(0.0, 1.0)


def body_center_rc(stack_hu: np.ndarray) -> tuple[float, float]:
    """Return the (row, column) centre of the body in an axial stack, in pixels.

    The centre is the mean position of voxels above ``BODY_THRESHOLD_HU``; a stack without
    any (all air) uses the image centre.
    """
    step = _BODY_SEARCH_STEP
    sample = stack_hu[::step, ::step, ::step]
    rows, cols = np.nonzero((sample > BODY_THRESHOLD_HU).any(axis=0))
    if rows.size == 0:
        logger.warning("No voxel above %.0f HU: centring the crop on the image centre.",
                       BODY_THRESHOLD_HU)
        return ((stack_hu.shape[1] - 1) / 2.0, (stack_hu.shape[2] - 1) / 2.0)
    mask = (sample > BODY_THRESHOLD_HU).sum(axis=0)
    weights = mask[rows, cols].astype(np.float64)
    row = float(np.average(rows, weights=weights)) * step + (step - 1) / 2.0
    col = float(np.average(cols, weights=weights)) * step + (step - 1) / 2.0
    return (min(row, stack_hu.shape[1] - 1.0), min(col, stack_hu.shape[2] - 1.0))


def _rows(stack: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Return `stack[indices]`, as a view without a copy when the indices are consecutive."""
    if indices.size and np.array_equal(indices, np.arange(indices[0], indices[0] + indices.size)):
        return stack[indices[0]:indices[0] + indices.size]
    return stack[indices]


class SlicePreprocessor:
    """Prepare slices of one axial stack for one network and map outputs back.

    Args:
        preprocessing: the model's manifest block.
        stack_shape: (slices, rows, columns) of the axial stack.
        stack_spacing_mm: spacing of the stack along (slice, row, column).
        center_rc: body centre (row, column) in stack pixels; the crop is centred there.
    """

    def __init__(
        self,
        preprocessing: Preprocessing,
        stack_shape: Sequence[int],
        stack_spacing_mm: Sequence[float],
        center_rc: tuple[float, float],
    ) -> None:
        self.prep = preprocessing
        self.num_slices, rows, cols = (int(v) for v in stack_shape)
        self.stack_shape_rc = (rows, cols)
        target = preprocessing.in_plane_spacing_mm
        self.resampled_shape = (
            max(1, round(rows * stack_spacing_mm[1] / target)),
            max(1, round(cols * stack_spacing_mm[2] / target)),
        )
        height, width = preprocessing.input_size
        scale_r = self.resampled_shape[0] / rows
        scale_c = self.resampled_shape[1] / cols
        # Top-left corner of the crop in resampled pixels; negative means padding.
        self.crop_origin = (
            round((center_rc[0] + 0.5) * scale_r - height / 2.0),
            round((center_rc[1] + 0.5) * scale_c - width / 2.0),
        )
        step = max(1, round(preprocessing.context_step_mm / float(stack_spacing_mm[0])))
        self.context_offsets = np.arange(-preprocessing.context_slices,
                                         preprocessing.context_slices + 1) * step
        # Slices prepared by the last `images` call: consecutive batches share context
        # slices, so each is windowed and resampled once instead of up to twice.
        self._last_stack: np.ndarray | None = None
        self._last_indices = np.empty(0, dtype=np.int64)
        self._last_prepared: torch.Tensor | None = None

    def context_indices(self, slice_indices: Sequence[int]) -> np.ndarray:
        """Return (batch, channels) stack indices of each slice's context, clamped at the ends."""
        indices = np.asarray(slice_indices)[:, None] + self.context_offsets[None, :]
        return np.clip(indices, 0, self.num_slices - 1)

    def images(self, stack_hu: np.ndarray, slice_indices: Sequence[int]) -> torch.Tensor:
        """Return network input (batch, channels, height, width), float32 in [0, 1].

        Slices prepared by the previous call on the same stack object are reused, so
        `stack_hu` must not change in place between calls.
        """
        context = self.context_indices(slice_indices)
        # Neighbouring samples share context slices, so each slice is prepared once.
        unique, inverse = np.unique(context, return_inverse=True)
        prepared = self._prepare_reusing_last(stack_hu, unique)
        return prepared[torch.from_numpy(inverse.reshape(context.shape))]

    def _prepare_reusing_last(self, stack_hu: np.ndarray, unique: np.ndarray) -> torch.Tensor:
        reusable = (np.isin(unique, self._last_indices) if self._last_stack is stack_hu
                    else np.zeros(len(unique), dtype=bool))
        if not reusable.any():
            prepared = self.prepare_slices(stack_hu, unique)
        else:
            prepared = torch.empty((len(unique), *self.prep.input_size), dtype=torch.float32)
            positions = np.searchsorted(self._last_indices, unique[reusable])
            prepared[torch.from_numpy(reusable)] = self._last_prepared[torch.from_numpy(positions)]
            if not reusable.all():
                missing = torch.from_numpy(~reusable)
                prepared[missing] = self.prepare_slices(stack_hu, unique[~reusable])
        self._last_stack, self._last_indices, self._last_prepared = stack_hu, unique, prepared
        return prepared

    def prepare_slices(self, stack_hu: np.ndarray, slice_indices: Sequence[int]) -> torch.Tensor:
        """Return single slices windowed, resampled and cropped: (n, height, width) float32.

        The window is a clip to its HU range followed by a linear map to [0, 1]. The
        interpolation weights of each output pixel sum to one, so the linear map gives
        the same result before or after resampling. It runs after, on the smaller image,
        and the clip is fused with the copy out of the stack: one pass over the
        full-size slices instead of three.
        """
        indices = np.asarray(slice_indices, dtype=np.int64)
        width_hu = self.prep.window_width_hu
        low_hu = self.prep.window_center_hu - width_hu / 2.0
        clipped = np.empty((len(indices), *self.stack_shape_rc), dtype=np.float32)
        np.clip(_rows(stack_hu, indices), low_hu, low_hu + width_hu, out=clipped,
                casting="unsafe")
        resampled = F.interpolate(torch.from_numpy(clipped)[:, None], size=self.resampled_shape,
                                  mode="bilinear", align_corners=False, antialias=True)
        unit = resampled.sub_(low_hu).div_(width_hu).clamp_(0.0, 1.0)
        return self._crop(unit, fill=0.0)[:, 0]

    def labels(self, labels_stack: np.ndarray, slice_indices: Sequence[int]) -> torch.Tensor:
        """Return label maps (batch, height, width), int64, resampled by nearest neighbour."""
        picked = torch.from_numpy(np.ascontiguousarray(labels_stack[np.asarray(slice_indices)]))
        resampled = F.interpolate(picked[:, None].float(), size=self.resampled_shape,
                                  mode="nearest-exact")
        return self._crop(resampled, fill=0.0)[:, 0].round().long()

    def restore(self, maps: torch.Tensor, fill: Sequence[float]) -> torch.Tensor:
        """Map network outputs (batch, k, height, width) back to (batch, k, rows, columns).

        Pixels outside the crop get `fill` (one value per channel, e.g. probability 1 for
        background). Maps are interpolated bilinearly, so pass probabilities, not labels.
        """
        batch, channels = maps.shape[:2]
        canvas = torch.empty((batch, channels, *self.resampled_shape), dtype=maps.dtype,
                             device=maps.device)
        canvas[:] = torch.as_tensor(fill, dtype=maps.dtype, device=maps.device)[None, :, None, None]
        src, dst = self._overlap()
        canvas[(slice(None), slice(None)) + dst] = maps[(slice(None), slice(None)) + src]
        return F.interpolate(canvas, size=self.stack_shape_rc, mode="bilinear",
                             align_corners=False)

    def image_box(self, multiple: int) -> tuple[slice, slice]:
        """Return the (rows, columns) box of the network input that the CT covers.

        Each side starts and ends at a multiple of `multiple`, so a network that halves
        its input log2(`multiple`) times pools the box on the same grid as the whole
        input. The rest of the input is padding.
        """
        crop_slices, _ = self._overlap()
        box = []
        for part, size in zip(crop_slices, self.prep.input_size):
            start = min(part.start // multiple * multiple, size - multiple)
            stop = min(size, -(-part.stop // multiple) * multiple)
            box.append(slice(start, max(stop, start + multiple)))
        return tuple(box)

    def _crop(self, resampled: torch.Tensor, fill: float) -> torch.Tensor:
        height, width = self.prep.input_size
        out = torch.full((resampled.shape[0], resampled.shape[1], height, width), fill,
                         dtype=resampled.dtype)
        src, dst = self._overlap()
        out[(slice(None), slice(None)) + src] = resampled[(slice(None), slice(None)) + dst]
        return out

    def _overlap(self) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """Return matching (crop, resampled) index ranges of the crop window."""
        crop_slices, resampled_slices = [], []
        for origin, size, extent in zip(self.crop_origin, self.prep.input_size,
                                        self.resampled_shape):
            start = max(origin, 0)
            stop = min(origin + size, extent)
            stop = max(stop, start)
            crop_slices.append(slice(start - origin, stop - origin))
            resampled_slices.append(slice(start, stop))
        return tuple(crop_slices), tuple(resampled_slices)
