"""The click protocol: interactive segmentation scored click by click (NoC@k, IoU curves).

One protocol for every evaluation (evaluation jobs, ``regcl bench cl``, ``regcl bench
interactive``), the standard one of interactive segmentation (RITM's evaluation code, SAM's
paper §7.1):

- Click 1 at the object's deepest interior point: the maximum of the Euclidean distance
  transform of the ground truth (the image border counts as background).
- Every next click at the deepest point of the *larger* error region of the previous
  prediction, larger **by maximum distance** (the deeper region, as RITM compares
  ``fn_max_dist > fp_max_dist``): the false-negative region gives a positive click (a miss),
  the false-positive region a negative one (a spill); when both are equally deep the click is
  negative, as in RITM. Pixels clicked before are not clicked again. Ties between equally deep
  pixels go to the first in raster order (smallest y, then x). A prediction without any error
  gets a padding point (label −1, segment-anything's "not a point").
- Every prediction is the single-mask output; with mask feedback the previous prediction's
  low-resolution logits go back in as ``mask_input`` (SamPredictor's interactive use), without
  it ("points only") every round decodes all clicks so far from scratch.
- NoC@k: the number of clicks until IoU ≥ k, capped at ``max_clicks`` (20): an image that
  never reaches k counts as 20.

Coordinates are (x, y) pixel centres (index + 0.5) in the model's input frame, as
:func:`regcl.data.prompts.sample_points` draws them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from segment_anything.modeling import Sam

from regcl.errors import ConfigError
from regcl.models.decoding import predict_masks_batched, preprocess, upscale_logits

__all__ = ["CLICK_CAP", "IOU_AFTER", "NOC_THRESHOLDS", "click_curves", "deepest_point",
           "image_embeddings", "interactive_summary", "next_clicks", "noc", "region_distances"]

CLICK_CAP = 20
NOC_THRESHOLDS = (0.80, 0.85, 0.90)
IOU_AFTER = (1, 3, 5, 10)

_CHUNK = 512  # candidate pixels whose exact distance is computed at a time

Embed = Callable[[slice], torch.Tensor]


def _axis_distance(region: torch.Tensor, dim: int) -> torch.Tensor:
    """Distance along ``dim`` (of ... x H x W bool) to the nearest pixel outside ``region``,
    the image border counting as outside (a virtual pixel at -1 and at the side)."""
    side = region.shape[dim]
    shape = [1] * region.ndim
    shape[dim] = side
    index = torch.arange(side, dtype=torch.int32).view(shape).expand_as(region)
    above = torch.where(region, -1, index).cummax(dim).values
    below = torch.where(region, side, index).flip(dim).cummin(dim).values.flip(dim)
    return torch.minimum(index - above, below - index).float()


def region_distances(region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``region`` (... x H x W bool): the vertical distance to the nearest outside pixel
    (the first pass of the separable Euclidean distance transform), and an upper bound of the
    Euclidean distance (the nearer of the vertical and the horizontal distance: those pixels
    are outside, so the nearest one is no farther). Both ... x H x W float."""
    vertical = _axis_distance(region, -2)
    return vertical, torch.minimum(vertical, _axis_distance(region, -1))


def deepest_point(region: torch.Tensor, exclude: torch.Tensor | None = None,
                  distances: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[float, int, int]:
    """The deepest pixel of ``region`` (H x W bool): exact Euclidean distance to the nearest
    pixel outside it, the border of the image counting as outside.

    A pixel's exact distance is the separable transform's second pass at that pixel,
    min over columns x' of (x − x')² + vertical(y, x')², computed only for the pixels whose
    upper bound could still beat the best found, most promising first: the result is the
    exhaustive search's, in a fraction of its time.

    Args:
        exclude: H x W bool, pixels that may not be chosen (clicked before); they still count
            as part of the region for the distances.
        distances: ``region_distances(region)`` if already computed.
    Returns:
        (distance, y, x); distance 0 and (-1, -1) when no pixel may be chosen.
    """
    h, w = region.shape
    allowed = region if exclude is None else region & ~exclude
    flat = allowed.flatten().nonzero().flatten()  # raster order
    if flat.numel() == 0:
        return 0.0, -1, -1
    vertical, upper = region_distances(region) if distances is None else distances
    upper, order = (upper.flatten()[flat] ** 2).sort(descending=True, stable=True)
    flat = flat[order]
    columns = torch.arange(-1, w + 1, dtype=torch.float32)  # with the virtual border columns
    squared = torch.cat([torch.zeros(h, 1), vertical ** 2, torch.zeros(h, 1)], 1)
    best, seen, found = -1.0, 0, []
    while seen < flat.numel() and float(upper[seen]) >= best:
        index = flat[seen : seen + _CHUNK]
        x = (index % w).float()
        d2 = ((x[:, None] - columns[None]) ** 2 + squared[index // w]).min(1).values
        found.append((d2, index))
        best = max(best, float(d2.max()))
        seen += index.numel()
    d2 = torch.cat([d for d, _ in found])
    index = torch.cat([i for _, i in found])
    pick = int(index[d2 == best].min())  # equally deep: the first in raster order
    return best ** 0.5, pick // w, pick % w


def next_clicks(pred: torch.Tensor, target: torch.Tensor, clicked: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The protocol's next click for each image.

    Args:
        pred: B x H x W bool, the previous prediction (all False before the first click: the
            miss is then the whole object, so the click lands at its deepest point).
        target: B x H x W bool ground truth.
        clicked: B x H x W bool, pixels clicked before (not clicked again), or None.
    Returns:
        coords B x 2 float (x, y) pixel centres and labels B int64: 1 for a click on a miss,
        0 on a spill, −1 (a padding point at the image centre) when the prediction has no error.
    """
    if pred.shape != target.shape or pred.ndim != 3:
        raise ConfigError(f"pred and target must both be B x H x W, got {tuple(pred.shape)} "
                          f"and {tuple(target.shape)}")
    b, h, w = target.shape
    pred, target = pred.cpu().bool(), target.cpu().bool()
    coords = torch.tensor([[w / 2, h / 2]]).repeat(b, 1)
    labels = torch.full((b,), -1, dtype=torch.int64)
    misses, spills = target & ~pred, pred & ~target
    miss_d, spill_d = region_distances(misses), region_distances(spills)
    for i in range(b):
        skip = None if clicked is None else clicked[i].cpu()
        miss, y_miss, x_miss = deepest_point(misses[i], skip, (miss_d[0][i], miss_d[1][i]))
        spill, y_spill, x_spill = deepest_point(spills[i], skip, (spill_d[0][i], spill_d[1][i]))
        if miss == 0 and spill == 0:
            continue
        positive = miss > spill
        y, x = (y_miss, x_miss) if positive else (y_spill, x_spill)
        coords[i] = torch.tensor([x + 0.5, y + 0.5])
        labels[i] = int(positive)
    return coords, labels


def _iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """B x H x W bool each → B IoU (an empty prediction of an empty target scores 1)."""
    inter = (pred & target).flatten(1).sum(1).float()
    union = (pred | target).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


@torch.no_grad()
def click_curves(sam: Sam, embed: Embed | torch.Tensor, masks: torch.Tensor,
                 max_clicks: int = CLICK_CAP, feedback: bool = True, batch_size: int = 32
                 ) -> torch.Tensor:
    """IoU after each click of the protocol, image by image.

    Args:
        sam: the model whose prompt encoder and mask decoder decode (its adapter, if any, is
            already in the embeddings).
        embed: N x C x h x w image embeddings, or a function from a slice of the images to
            their embeddings (so only ``batch_size`` embeddings are held at a time).
        masks: N x S x S bool ground truth, S the model's input size.
        feedback: feed the previous low-res logits back as ``mask_input``.
    Returns:
        N x max_clicks float32 on the CPU: IoU after clicks 1 .. max_clicks.
    """
    if max_clicks < 1:
        raise ConfigError(f"max_clicks must be >= 1, got {max_clicks}")
    was_training = sam.training
    sam.eval()
    device = sam.device
    size = sam.image_encoder.img_size
    n = masks.shape[0]
    out = []
    for start in range(0, n, batch_size):
        part = slice(start, min(start + batch_size, n))
        emb = embed(part) if callable(embed) else embed[part]
        emb = emb.to(device)
        target = masks[part].cpu().bool()
        b = target.shape[0]
        pred = torch.zeros_like(target)
        clicked = torch.zeros_like(target)
        coords = torch.zeros(b, 0, 2)
        labels = torch.zeros(b, 0, dtype=torch.int64)
        low = None
        ious = []
        for _ in range(max_clicks):
            xy, label = next_clicks(pred, target, clicked)
            real = label >= 0
            rows = torch.arange(b)[real]
            clicked[rows, xy[real, 1].long(), xy[real, 0].long()] = True
            coords = torch.cat([coords, xy[:, None]], 1)
            labels = torch.cat([labels, label[:, None]], 1)
            low, _ = predict_masks_batched(sam, emb, coords.to(device), labels.to(device),
                                           mask_inputs=low if feedback else None)
            pred = (upscale_logits(low, size)[:, 0] > 0).cpu()
            ious.append(_iou(pred, target))
        out.append(torch.stack(ious, 1))
    sam.train(was_training)
    return torch.cat(out)


def image_embeddings(sam: Sam, images: torch.Tensor) -> Embed:
    """An ``embed`` for :func:`click_curves`: the image encoder on a slice of ``images``
    (N x 3 x S x S float in [0, 255]), run on the model's device."""

    def embed(part: slice) -> torch.Tensor:
        return sam.image_encoder(preprocess(sam, images[part].to(sam.device)))

    return embed


def noc(curves: torch.Tensor, threshold: float) -> torch.Tensor:
    """Clicks to reach IoU ≥ ``threshold`` per image (N x K curves → N float); an image that
    never reaches it counts as K (the cap)."""
    reached = curves >= threshold
    first = reached.float().argmax(1) + 1
    return torch.where(reached.any(1), first, torch.full_like(first, curves.shape[1])).float()


def interactive_summary(curves: torch.Tensor, iou_after: Sequence[int] = IOU_AFTER,
                        thresholds: Sequence[float] = NOC_THRESHOLDS) -> dict[str, float]:
    """Means over images: ``iou@k`` for k in ``iou_after`` (clicks beyond the curve are
    skipped) and ``noc@80`` etc. for each threshold, with the cap the curves' length."""
    out = {f"iou@{k}": float(curves[:, k - 1].mean()) for k in iou_after if k <= curves.shape[1]}
    for t in thresholds:
        out[f"noc@{round(t * 100)}"] = float(noc(curves, t).mean())
    return out
