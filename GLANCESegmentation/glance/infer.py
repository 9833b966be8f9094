"""Step 3 of "Segment nodules": batched slice inference on CPU or GPU.

Slices of the lung crop go through the network in batches (2k+1 neighbouring
slices as channels when the model card asks for 2.5D input), resampled
in-plane to the card's pixel spacing and back. The two outputs land on the
canonical grid as uint8 (p * 255), small enough to save and re-threshold later.
Progress is reported after every batch; cancellation is checked between batches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np

from glance.errors import Cancelled, GlanceError
from glance.preprocess import Crop, slice_stack, window, working_size

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]


@dataclass
class InferenceOptions:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch: int = 8
    # auto: fp16 autocast on GPU, fp32 on CPU; bf16 opts in to CPU autocast (AMX/AVX512-BF16).
    precision: str = "auto"
    threads: int = 0  # CPU threads for torch; 0 keeps torch's default
    # Test-time augmentation: average the maps over the four in-plane flips (4x the model time).
    # A nodule has no preferred side, so the mean cancels part of the network's orientation noise.
    tta: bool = False


@dataclass
class Maps:
    prob: np.ndarray  # uint8, canonical grid
    heatmap: np.ndarray  # uint8, canonical grid
    seconds: dict[str, float] = field(default_factory=dict)


def select_device(name: str = "auto"):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GlanceError("--device cuda: no CUDA GPU is available to this torch build")
    try:
        return torch.device(name)
    except RuntimeError:
        raise GlanceError(f"unknown device {name!r} (use auto, cpu or cuda)") from None


def device_description(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _autocast(device, precision: str):
    import torch

    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    if dtype is None:
        raise GlanceError(f"unknown precision {precision!r} (use auto, fp32, fp16 or bf16)")
    return torch.autocast(device.type, dtype=dtype)


def _to_uint8(p):
    import torch

    return (p * 255.0 + 0.5).clamp_(0, 255).to(torch.uint8)


def output_maps(model, x):
    """(seg, heatmap) probabilities of one batch, float32, shape (n, 2, h, w)."""
    import torch

    out = model(x)
    return torch.sigmoid(torch.cat([out.seg, out.heatmap], dim=1).float())


_IN_PLANE_FLIPS = ((), (3,), (2,), (2, 3))


def mean_over_flips(model, x):
    """output_maps averaged over the in-plane flips, each flipped back before adding."""
    total = None
    for dims in _IN_PLANE_FLIPS:
        maps = output_maps(model, x.flip(dims) if dims else x)
        maps = maps.flip(dims) if dims else maps
        total = maps if total is None else total.add_(maps)
    return total.div_(len(_IN_PLANE_FLIPS))


def predict(hu, spacing, crop: Crop, model, prep, options: InferenceOptions,
            progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> Maps:
    """Network outputs for every slice of ``crop`` on the canonical grid ``hu`` (int16 HU)."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    if options.threads:
        torch.set_num_threads(options.threads)
    model = model.to(memory_format=torch.channels_last)
    prob = np.zeros(hu.shape, np.uint8)
    heat = np.zeros(hu.shape, np.uint8)
    h, w = crop.shape[1:]
    size = working_size((h, w), spacing[1:], prep.pixel_spacing_mm)
    low, high = prep.window_hu
    zs = np.arange(*crop.z)
    ys, xs = crop.slices[1:]
    seconds = {"preprocess": 0.0, "model": 0.0}
    for done in range(0, len(zs), options.batch):
        if cancel is not None and cancel():
            raise Cancelled("cancelled by the user")
        t0 = time.perf_counter()
        z = zs[done:done + options.batch]
        x = torch.from_numpy(window(slice_stack(hu, z, prep.context_slices, crop), low, high)).to(device)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x = x.contiguous(memory_format=torch.channels_last)
        t1 = time.perf_counter()
        with torch.inference_mode(), _autocast(device, options.precision):
            maps = mean_over_flips(model, x) if options.tta else output_maps(model, x)
        if size != (h, w):
            maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
        maps = _to_uint8(maps).cpu().numpy()
        t2 = time.perf_counter()
        prob[z, ys, xs] = maps[:, 0]
        heat[z, ys, xs] = maps[:, 1]
        seconds["preprocess"] += t1 - t0
        seconds["model"] += t2 - t1
        if progress is not None:
            progress(min(done + options.batch, len(zs)), len(zs))
    log.debug("inference: %d slices at %s px, %s", len(zs), size, seconds)
    return Maps(prob, heat, seconds)
