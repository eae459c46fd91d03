"""Synthetic *target* domains: five deterministic stand-ins for the paper's domain sequence,
and a shifted twin of each (:data:`SHIFTED_ORDER`: the same scenes through another imaging
device, :mod:`regcl.data.shifts`) for sequences of ten (:data:`LONG_ORDER`).

The tiny SAM is pretrained on :func:`regcl.data.synthetic.source_scenes` (flat shapes in
contrasting colours). Each target domain breaks that prior a different way, so zero-shot SAM does
poorly, an adapter can learn the domain, and the domains pull an adapter in conflicting
directions (sequential fine-tuning forgets):

- ``polyp`` (Kvasir-SEG): a slightly *brighter*, redder blob on pink mucosa, low contrast.
- ``camo`` (CAMO): the object wears the background's blotchy texture; only its edge gives it away.
- ``shadow`` (ISTD): the target is a *darkened* copy of the scene (multiplicative, bluish).
- ``skin`` (ISIC): a *dark* brown lesion with fuzzy borders under hairs.
- ``camo_pattern`` (COD10K): an oriented pattern, the object the same pattern turned or shifted.

A generator is ``(gen, batch, size) -> (images B x 3 x S x S float in [0, 255], rounded;
masks B x S x S bool)``, one target per image. Splits are read through
:func:`regcl.data.synthetic.chunked`, so sample ``i`` does not depend on how many are read.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from regcl.data import shifts
from regcl.data.shifts import shifted
from regcl.data.synthetic import (
    chunked,
    contrasting_colours,
    coordinate_grid,
    shape_masks,
    smooth_noise,
    source_scenes,
    uniform,
)
from regcl.data.types import Sample, SampleDataset
from regcl.errors import ConfigError

Tensor = torch.Tensor
Generate = Callable[[torch.Generator, int, int], tuple[Tensor, Tensor]]
SPLITS = ("train", "test")


# --- shared helpers -------------------------------------------------------------------------


def _blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur of x (B x C x S x S) with one sigma (pixels) per scene (B)."""
    b, c, h, w = x.shape
    factor = max(1, int(float(sigma.max()) // 3))
    if factor > 1:  # wide blurs run on a coarser grid: the result is smooth, nothing is lost
        small = F.avg_pool2d(x, factor, ceil_mode=True)
        out = _blur(small, sigma / factor)
        # Bicubic, not bilinear: shading differentiates this, and bilinear slopes are stepwise.
        return F.interpolate(out, (h, w), mode="bicubic", align_corners=False)
    sig = sigma.clamp(min=0.3).repeat_interleave(c)
    radius = math.ceil(3 * float(sig.max()))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / sig[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)
    y = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="replicate")
    y = F.conv2d(y, kernel.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, kernel.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w)


def _dome(mask: Tensor, spread: float = 0.4) -> Tensor:
    """A height field, B x 1 x S x S: 0 outside and at the edge of the mask, rising to ~1 inside.
    Drives shading and colour variegation that follow the object's shape; the blur scales with
    the radius (pixels) of the disc of the mask's area, so small and large objects look alike."""
    m = mask.float().unsqueeze(1)
    radius = (m.sum((1, 2, 3)) / math.pi).sqrt().clamp(min=1.0)
    return ((_blur(m, spread * radius) - 0.5) * 2.5).clamp(0, 1) * m


def _lambert(height: Tensor, angle: Tensor) -> Tensor:
    """Directional shading of a height field (B x 1 x S x S) lit from ``angle`` (B x 1 x 1 x 1),
    scaled so a dome gives about ±1 on its flanks whatever its size."""
    gx = F.pad(height[..., :, 2:] - height[..., :, :-2], (1, 1, 0, 0), mode="replicate")
    gy = F.pad(height[..., 2:, :] - height[..., :-2, :], (0, 0, 1, 1), mode="replicate")
    scale = height.shape[-1] / 16
    return (gx * torch.cos(angle) + gy * torch.sin(angle)) * scale


def _curves(gen: torch.Generator, batch: int, size: int, count: int,
            width: tuple[float, float], density: Tensor) -> Tensor:
    """Thin bent lines (hairs), B x 1 x S x S in [0, 1]: ``count`` candidate lines per scene,
    each kept with that scene's probability ``density`` (B x 1 x 1)."""
    yy, xx = coordinate_grid(size)
    pixel = 2.0 / size
    # All parameters in one draw: few big ops beat many small ones on a busy CPU.
    low = torch.tensor([0, -1, -1, 0, -0.3, 0.3, width[0] * pixel]).view(-1, 1, 1, 1, 1)
    high = torch.tensor([1, 1, 1, math.pi, 0.3, 1.6, width[1] * pixel]).view(-1, 1, 1, 1, 1)
    draw = low + (high - low) * torch.rand((7, count, batch, 1, 1), generator=gen)
    keep, cx, cy, angle, bend, half, w = draw
    keep = (keep < density).float()
    cos, sin = torch.cos(angle), torch.sin(angle)
    out = torch.zeros((batch, size, size))
    for k in range(count):
        dx, dy = xx - cx[k], yy - cy[k]
        u, v = dx * cos[k] + dy * sin[k], dy * cos[k] - dx * sin[k]
        # Distance to the parabola v = bend u^2, to first order: |offset| / sqrt(1 + slope^2).
        dist = (v - bend[k] * u**2).abs() * torch.rsqrt(1 + (2 * bend[k] * u) ** 2)
        ends = torch.sigmoid((half[k] - u.abs()) / (3 * pixel))
        out = torch.maximum(out, torch.exp(-((dist / w[k]) ** 2)) * ends * keep[k])
    return out.unsqueeze(1)


def _per_scene(gen: torch.Generator, batch: int, low: float, high: float) -> Tensor:
    """One uniform value per scene, B x 1 x 1 x 1 (broadcasts over B x C x S x S)."""
    return uniform(gen, (batch, 1, 1, 1), low, high)


def _pick(gen: torch.Generator, palettes: Tensor, batch: int, jitter: float) -> Tensor:
    """One palette per scene from K x N x 3 choices, rescaled in brightness and jittered a little
    per colour (so hues stay natural): B x N x 3 x 1 x 1."""
    index = torch.randint(0, palettes.shape[0], (batch,), generator=gen)
    chosen = palettes[index] * uniform(gen, (batch, 1, 1), 0.8, 1.2)
    chosen = chosen + torch.randn((batch, *palettes.shape[1:]), generator=gen) * jitter
    return chosen.clamp(0, 255).view(batch, palettes.shape[1], 3, 1, 1)


def _finish(image: Tensor, gen: torch.Generator, noise: tuple[float, float]) -> Tensor:
    """Sensor noise, clamp and round: every domain's images end as integers in [0, 255]."""
    sigma = uniform(gen, (image.shape[0], 1, 1, 1), *noise)
    return (image + torch.randn(image.shape, generator=gen) * sigma).clamp(0, 255).round()


def _animal(gen: torch.Generator, batch: int, size: int) -> Tensor:
    """Irregular, elongated, animal-like blobs (B x S x S) for the camouflage domains."""
    return shape_masks(gen, batch, size, center_range=0.4, scale=(0.3, 0.7),
                       aspect=(0.35, 0.8), log_power=(math.log(1.5), math.log(2.6)),
                       wobble=(0.12, 0.35), harmonics=6)


# --- the five target domains ----------------------------------------------------------------


def polyp(gen: torch.Generator, batch: int, size: int) -> tuple[Tensor, Tensor]:
    """Endoscopy: pink mucosa with dark vessels, a round field of view and specular glints; the
    target is a rounded blob only slightly redder and brighter than the tissue, lit like a dome."""
    yy, xx = coordinate_grid(size)
    base = torch.stack([uniform(gen, (batch,), lo, hi) for lo, hi in
                        ((190, 240), (85, 135), (80, 125))], 1).view(batch, 3, 1, 1)
    tissue = base * (1 + 0.12 * smooth_noise(gen, batch, size, cells=(3, 6)))
    tissue = tissue + 6 * smooth_noise(gen, batch, size, 3, cells=(10, 20))
    # Vessels: zero crossings of smooth noise meander like capillaries; they redden and darken.
    for cells, w, depth in (((3, 6), 0.06, 0.35), ((8, 14), 0.05, 0.2)):
        lines = torch.exp(-((smooth_noise(gen, batch, size, cells=cells) / w) ** 2))
        lines = lines * torch.sigmoid(3 * smooth_noise(gen, batch, size, cells=(3, 6)))  # fade
        strength = _per_scene(gen, batch, 0.3, 1.0) * depth
        tissue = tissue * (1 - strength * lines * torch.tensor([0.5, 1.0, 0.9]).view(1, 3, 1, 1))
    mask = shape_masks(gen, batch, size, center_range=0.45, scale=(0.25, 0.7),
                       aspect=(0.6, 1.0), log_power=(math.log(1.6), math.log(3.0)),
                       wobble=(0.0, 0.15), harmonics=3)
    dome = _dome(mask)
    edge = _blur(mask.float().unsqueeze(1), torch.full((batch,), size / 200))
    gain = _per_scene(gen, batch, 0.05, 0.16)
    tint = torch.tensor([1.0, 0.94, 0.95]).view(1, 3, 1, 1) ** _per_scene(gen, batch, 0, 1)
    shade = _lambert(dome, _per_scene(gen, batch, 0, 2 * math.pi))
    mottle = 0.04 * smooth_noise(gen, batch, size, cells=(12, 24))
    polyp_look = tissue * tint * (1 + gain * (0.3 + dome) + 0.1 * shade + mottle)
    image = tissue + edge * (polyp_look - tissue)
    # Specular glints: white where fine noise peaks, denser on the polyp's bulge.
    glint = smooth_noise(gen, batch, size, cells=(16, 32))
    level = _per_scene(gen, batch, 2.2, 2.8) - 1.3 * dome
    spots = _blur(((glint - level) * 4).clamp(0, 1), torch.full((batch,), size / 256))
    image = image + spots * (250 - image)
    # Round field of view with darkened periphery, corners black.
    r = torch.sqrt(xx**2 + yy**2)
    fov = torch.sigmoid((_per_scene(gen, batch, 1.05, 1.35) - r) * size / 6)
    image = image * fov * (1 - _per_scene(gen, batch, 0.2, 0.5) * r**2).clamp(min=0)
    mask = mask & (fov[:, 0] > 0.5)
    image = _blur(image, uniform(gen, (batch,), 0.3, 1.0) * size / 256)
    return _finish(image, gen, (1, 4)), mask


CAMO_PALETTES = torch.tensor([
    [[55, 75, 40], [100, 120, 60], [150, 140, 85]],  # forest floor
    [[95, 75, 50], [150, 125, 85], [195, 175, 130]],  # dry grass and bark
    [[45, 65, 45], [80, 100, 55], [125, 120, 75]],  # moss
    [[85, 80, 70], [130, 125, 110], [175, 170, 150]],  # rock and lichen
    [[70, 55, 35], [120, 95, 60], [90, 110, 55]],  # leaf litter
], dtype=torch.float32)


def _blotches(gen: torch.Generator, palette: Tensor, size: int) -> Tensor:
    """Natural blotchy texture in a 3-colour palette (B x 3 x 3 x 1 x 1): B x 3 x S x S."""
    batch = palette.shape[0]
    first = torch.sigmoid(3 * smooth_noise(gen, batch, size, cells=(5, 12)))
    second = torch.sigmoid(4 * (smooth_noise(gen, batch, size, cells=(8, 16)) - 0.6))
    image = palette[:, 0] + (palette[:, 1] - palette[:, 0]) * first
    image = image + (palette[:, 2] - image) * second
    return image * (1 + 0.08 * smooth_noise(gen, batch, size, cells=(40, 64)))


def camo(gen: torch.Generator, batch: int, size: int) -> tuple[Tensor, Tensor]:
    """Camouflage: an animal-shaped blob wearing an independent draw of the background's blotchy
    texture and palette; only a texture seam, a small brightness shift, soft 3D shading and a
    faint outline separate it. Distractor blobs have the seam but none of the other cues."""
    palette = _pick(gen, CAMO_PALETTES, batch, jitter=6)
    image = _blotches(gen, palette, size)
    active = torch.rand((batch, 3), generator=gen) < 0.5
    for k in range(3):
        blob = _animal(gen, batch, size) & active[:, k].view(-1, 1, 1)
        image = torch.where(blob.unsqueeze(1), _blotches(gen, palette, size), image)
    mask = _animal(gen, batch, size)
    m = mask.float().unsqueeze(1)
    shift = _per_scene(gen, batch, 4, 16) * torch.randn((batch, 1, 1, 1), generator=gen).sign()
    dome = _dome(mask)
    body = _blotches(gen, palette, size) + shift
    body = body * (1 + 0.08 * _lambert(dome, _per_scene(gen, batch, 0, 2 * math.pi)))
    image = torch.where(mask.unsqueeze(1), body, image)
    soft = _blur(m, torch.full((batch,), size / 128))
    outline = (4 * soft * (1 - soft)) ** 2
    image = image * (1 - _per_scene(gen, batch, 0.0, 0.2) * outline)
    return _finish(image, gen, (2, 6)), mask


def _ground(gen: torch.Generator, batch: int, size: int) -> Tensor:
    """Brightly lit ground, B x 3 x S x S: tiles, grass, gravel or concrete (one per scene)."""
    yy, xx = coordinate_grid(size)
    angle = _per_scene(gen, batch, -0.4, 0.4)
    tile = _per_scene(gen, batch, 0.2, 0.5)
    u = (xx * torch.cos(angle) + yy * torch.sin(angle)) / tile
    v = (-xx * torch.sin(angle) + yy * torch.cos(angle)) / tile
    grout = torch.minimum(torch.sin(math.pi * u).abs(), torch.sin(math.pi * v).abs())
    per_tile = torch.frac(torch.sin(torch.floor(u) * 12.99 + torch.floor(v) * 78.23) * 4375.5)
    tiles = 1 + 0.12 * (per_tile - 0.5) - 0.35 * torch.exp(-((grout / 0.06) ** 2))
    fine = smooth_noise(gen, batch, size, cells=(48, 80))
    blades = torch.sin(60 * (xx * 0.3 + yy) + 4 * smooth_noise(gen, batch, size, cells=(12, 24)))
    grass = 1 + 0.15 * fine + 0.1 * blades + 0.1 * smooth_noise(gen, batch, size, cells=(4, 8))
    gravel = 1 + 0.3 * torch.tanh(2 * smooth_noise(gen, batch, size, cells=(40, 64)))
    concrete = 1 + 0.06 * fine + 0.06 * smooth_noise(gen, batch, size, cells=(3, 8))
    kind = torch.randint(0, 4, (batch, 1, 1, 1), generator=gen)
    colours = torch.tensor([[215, 205, 190], [110, 165, 70], [175, 165, 150], [200, 198, 192]],
                           dtype=torch.float32)
    colour = colours[kind.view(-1)].view(batch, 3, 1, 1) * _per_scene(gen, batch, 0.8, 1.1)
    colour = colour + torch.randn((batch, 3, 1, 1), generator=gen) * 8
    pattern = torch.stack([tiles, grass, gravel, concrete])[kind.view(-1), torch.arange(batch)]
    return colour * pattern


def shadow(gen: torch.Generator, batch: int, size: int) -> tuple[Tensor, Tensor]:
    """Cast shadow: the scene darkened multiplicatively (x0.35–0.6, bluish) under a soft-edged
    region. Shadows of poles or people are long tapering capsules (a head at the end for a
    person) whose bright caster stands at the foot, outside the mask; the rest are blobs."""
    yy, xx = coordinate_grid(size)
    image = _ground(gen, batch, size)
    # Dark flat stains: dark but not a shadow (texture gone), so darkness alone is not the cue.
    stain = shape_masks(gen, batch, size, scale=(0.08, 0.2))
    stain = stain & (torch.rand((batch, 1, 1), generator=gen) < 0.3)
    image = torch.where(stain.unsqueeze(1), _per_scene(gen, batch, 40, 90), image)
    foot = uniform(gen, (2, batch, 1, 1), -0.6, 0.6)
    angle = uniform(gen, (batch, 1, 1), 0, 2 * math.pi)
    length = uniform(gen, (batch, 1, 1), 0.6, 1.4)
    width = uniform(gen, (batch, 1, 1), 0.06, 0.16)
    dx, dy = xx - foot[0], yy - foot[1]
    along = dx * torch.cos(angle) + dy * torch.sin(angle)
    t = (along / length).clamp(0, 1)
    dist = torch.sqrt((dx - t * length * torch.cos(angle)) ** 2
                      + (dy - t * length * torch.sin(angle)) ** 2)
    wobble = 0.25 * width * smooth_noise(gen, batch, size, cells=(6, 12))[:, 0]
    capsule = dist + wobble < width * (1 - 0.4 * t)
    head_at = foot + (length + 0.06) * torch.stack([torch.cos(angle), torch.sin(angle)])
    head = (xx - head_at[0]) ** 2 + (yy - head_at[1]) ** 2 < (1.4 * width) ** 2
    person = torch.rand((batch, 1, 1), generator=gen) < 0.5
    cast = capsule | (head & person)
    blob = shape_masks(gen, batch, size, scale=(0.3, 0.65), wobble=(0.05, 0.3))
    is_blob = torch.rand((batch, 1, 1), generator=gen) < 0.35
    region = torch.where(is_blob, blob, cast).float().unsqueeze(1)
    alpha = _blur(region, uniform(gen, (batch,), 1.0, 4.0) * size / 256)
    factor = _per_scene(gen, batch, 0.35, 0.6)
    tint = factor * torch.tensor([0.88, 0.97, 1.2]).view(1, 3, 1, 1)
    image = image * (1 - alpha * (1 - tint))
    caster = ((xx - foot[0]) ** 2 + (yy - foot[1]) ** 2 < (1.5 * width) ** 2) & ~is_blob
    bright = contrasting_colours(gen, torch.full((batch, 3, 1, 1), 60.0), (150, 220))
    image = torch.where(caster.unsqueeze(1), bright, image)
    mask = (alpha[:, 0] > 0.5) & ~caster
    return _finish(image, gen, (1, 5)), mask


def skin(gen: torch.Generator, batch: int, size: int) -> tuple[Tensor, Tensor]:
    """Dermoscopy: smooth skin tone, a brown lesion darker towards its centre with variegated
    colour and fuzzy borders, dark hairs over everything, sometimes dark corners and a ruler."""
    yy, xx = coordinate_grid(size)
    base = torch.stack([uniform(gen, (batch,), lo, hi) for lo, hi in
                        ((195, 240), (145, 185), (125, 165))], 1).view(batch, 3, 1, 1)
    redness = torch.tensor([1.0, -0.8, -0.5]).view(1, 3, 1, 1)
    image = base * (1 + 0.05 * smooth_noise(gen, batch, size, cells=(2, 5)))
    image = image + 10 * redness * smooth_noise(gen, batch, size, cells=(4, 10)).clamp(min=0)
    shape = shape_masks(gen, batch, size, center_range=0.3, scale=(0.3, 0.7), aspect=(0.6, 1.0),
                        log_power=(math.log(1.6), math.log(2.6)), wobble=(0.05, 0.3),
                        harmonics=6)
    soft = _blur(shape.float().unsqueeze(1), uniform(gen, (batch,), 2.0, 6.0) * size / 256)
    alpha = (soft + 0.2 * smooth_noise(gen, batch, size, cells=(16, 32)) * 4 * soft * (1 - soft))
    alpha = ((alpha - 0.5) * 1.6 + 0.5).clamp(0, 1)
    mask = alpha[:, 0] > 0.5
    dome = _dome(mask, spread=0.5)
    light = torch.tensor([170, 120, 90]) + torch.randn((batch, 3), generator=gen) * 10
    dark = torch.tensor([85, 55, 40]) + torch.randn((batch, 3), generator=gen) * 8
    light, dark = light.view(batch, 3, 1, 1), dark.view(batch, 3, 1, 1)
    depth = (1.2 * dome + 0.35 * smooth_noise(gen, batch, size, cells=(6, 14))).clamp(0, 1)
    lesion = light + (dark - light) * depth
    veil = (smooth_noise(gen, batch, size, cells=(4, 8)) - 1.0).clamp(0, 1) * dome
    lesion = lesion + veil * (torch.tensor([105, 110, 130]).view(1, 3, 1, 1) - lesion)
    dots = (smooth_noise(gen, batch, size, cells=(30, 50)) - 1.8).clamp(0, 1) * dome
    lesion = lesion * (1 - 0.5 * dots)
    image = image + alpha * (lesion - image)
    hairs = _curves(gen, batch, size, 8, (0.5, 1.1), uniform(gen, (batch, 1, 1), -0.4, 0.7))
    image = image + 0.85 * hairs * (torch.tensor([45, 32, 25]).view(1, 3, 1, 1) - image)
    # Ruler ticks along one edge; they sit over the image and are not lesion.
    vertical = torch.rand((batch, 1, 1), generator=gen) < 0.5
    pos, across = torch.where(vertical, xx, yy), torch.where(vertical, yy, xx)
    edge = uniform(gen, (batch, 1, 1), 0.78, 0.9)
    tick_len = torch.where(torch.sin(math.pi * across * 4) > 0.7, 0.1, 0.05)
    ticks = (torch.sin(math.pi * across * 20) > 0.85) & ((pos - edge).abs() < tick_len)
    ticks = ticks & (torch.rand((batch, 1, 1), generator=gen) < 0.2)
    image = torch.where(ticks.unsqueeze(1), 30.0, image)
    r = torch.sqrt(xx**2 + yy**2)
    fov = torch.sigmoid((_per_scene(gen, batch, 1.0, 1.3) - r) * size / 8)
    corners = torch.rand((batch, 1, 1, 1), generator=gen) < 0.5
    image = image * torch.where(corners, fov, torch.ones_like(fov))
    mask = mask & ~ticks
    return _finish(image, gen, (1, 4)), mask


def _oriented(kind: Tensor, u: Tensor, v: Tensor, freq: Tensor, phase: Tensor,
              warp: Tensor) -> Tensor:
    """Oriented high-frequency pattern in [-1, 1]: stripes, elongated spots or reeds, picked per
    scene by ``kind`` (B x 1 x 1 x 1); u runs across the orientation, v along it."""
    wave = torch.sin(math.pi * freq * u + phase + warp)
    stripes = torch.tanh(2.5 * wave)
    spots = torch.tanh(4 * (wave * torch.sin(math.pi * freq * 0.4 * v + 1.3 * phase) - 0.25))
    reeds = torch.tanh(5 * (wave - 0.55)) * (0.7 + 0.3 * torch.sin(math.pi * freq * 0.15 * v))
    return torch.where(kind == 0, stripes, torch.where(kind == 1, spots, reeds))


def camo_pattern(gen: torch.Generator, batch: int, size: int) -> tuple[Tensor, Tensor]:
    """Patterned camouflage: oriented stripes, spots or reeds in a sandy-to-grey palette; the
    object carries the same pattern turned by 20–70 degrees, rescaled and re-phased."""
    yy, xx = coordinate_grid(size)
    kind = torch.randint(0, 3, (batch, 1, 1, 1), generator=gen)
    warp = 1.2 * smooth_noise(gen, batch, size, cells=(3, 6))
    freq = _per_scene(gen, batch, 6, 14)

    def pattern(angle: Tensor, scale: Tensor) -> Tensor:
        u = xx * torch.cos(angle) + yy * torch.sin(angle)
        v = -xx * torch.sin(angle) + yy * torch.cos(angle)
        phase = _per_scene(gen, batch, 0, 2 * math.pi)
        return _oriented(kind, u, v, freq * scale, phase, warp)

    angle = _per_scene(gen, batch, 0, math.pi)
    turn = _per_scene(gen, batch, 0.35, 1.2) * torch.randn((batch, 1, 1, 1), generator=gen).sign()
    mask = _animal(gen, batch, size)
    inside = pattern(angle + turn, _per_scene(gen, batch, 0.85, 1.2))
    p = torch.where(mask.unsqueeze(1), inside, pattern(angle, torch.ones(batch, 1, 1, 1)))
    sandy = _per_scene(gen, batch, 0, 1)
    light = 190 + sandy * torch.tensor([20.0, 0.0, -45.0]).view(1, 3, 1, 1)
    dark = 85 + sandy * torch.tensor([25.0, 10.0, -15.0]).view(1, 3, 1, 1)
    light = light * _per_scene(gen, batch, 0.85, 1.1)
    image = dark + (light - dark) * (0.5 + 0.5 * p)
    image = image * (1 + 0.12 * smooth_noise(gen, batch, size, cells=(3, 8)))
    return _finish(image, gen, (2, 8)), mask


# --- registry and splits --------------------------------------------------------------------


@dataclass(frozen=True)
class DomainSpec:
    """A named synthetic domain: ``generate(gen, batch, size) -> (images, masks)``."""

    name: str
    description: str
    generate: Generate
    paper_counterpart: str


SOURCE = DomainSpec("source", "flat and textured shapes in contrasting colours (pretraining)",
                    source_scenes, "SA-1B")
DOMAINS: dict[str, DomainSpec] = {spec.name: spec for spec in (
    DomainSpec("polyp", "slightly brighter, redder dome-lit blob on pink mucosa", polyp,
               "Kvasir-SEG"),
    DomainSpec("camo", "animal blob wearing the background's blotchy texture", camo, "CAMO"),
    DomainSpec("shadow", "multiplicatively darkened, bluish cast shadow on textured ground",
               shadow, "ISTD"),
    DomainSpec("skin", "dark brown variegated lesion with fuzzy border under hairs", skin,
               "ISIC 2017"),
    DomainSpec("camo_pattern", "oriented pattern, the object the same pattern turned",
               camo_pattern, "COD10K"),
)}
PAPER_ORDER = ("polyp", "camo", "shadow", "skin", "camo_pattern")
# A second parameterisation of each family: the same scenes through another imaging device
# (regcl.data.shifts), for sequences of ten domains.
DOMAINS.update({spec.name: spec for spec in (
    DomainSpec("polyp_nbi", "polyp scenes in narrow-band-imaging colours (teal and brown)",
               shifted(polyp, shifts.nbi), "Kvasir-SEG, NBI"),
    DomainSpec("camo_night", "camouflage scenes in low light: dark, blue cast, noisy",
               shifted(camo, shifts.night), "CAMO, at night"),
    DomainSpec("shadow_aerial", "shadow scenes as grey, hazy aerial photographs",
               shifted(shadow, shifts.aerial), "ISTD, aerial grey"),
    DomainSpec("skin_uv", "skin lesions under a Wood's lamp: bright lesion, dark violet skin",
               shifted(skin, shifts.uv), "ISIC, Wood's lamp"),
    DomainSpec("camo_pattern_thermal", "patterned camouflage as inverted, blurred thermal images",
               shifted(camo_pattern, shifts.thermal), "COD10K, thermal"),
)})
SHIFTED_ORDER = ("polyp_nbi", "camo_night", "shadow_aerial", "skin_uv", "camo_pattern_thermal")
LONG_ORDER = PAPER_ORDER + SHIFTED_ORDER
"""Ten domains: the paper's five, then their shifted twins in the same family order."""


def get_domain(name: str) -> DomainSpec:
    """The target domain ``name``, or :data:`SOURCE` for ``"source"``; else ConfigError."""
    if name == SOURCE.name:
        return SOURCE
    if name not in DOMAINS:
        known = ", ".join((SOURCE.name, *DOMAINS))
        raise ConfigError(f"unknown synthetic domain {name!r}; known: {known}")
    return DOMAINS[name]


def split_seed(name: str, split: str) -> int:
    """Stable seed of a (domain, split): crc32, since Python's ``hash`` is salted per process."""
    return zlib.crc32(f"regcl/{name}/{split}".encode())


def domain_split(name: str, split: str, count: int, size: int = 256, *,
                 start: int = 0) -> tuple[Tensor, Tensor]:
    """Samples ``start .. start+count-1`` of a domain's split: images count x 3 x S x S float in
    [0, 255], masks count x S x S bool. Train and test come from different seeds."""
    spec = get_domain(name)
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if count < 1 or start < 0 or size < 16:
        raise ConfigError(f"need count >= 1, start >= 0, size >= 16; got {count}, {start}, {size}")
    images, masks = chunked(spec.generate, split_seed(name, split), start, count, size)
    return images, masks


class SyntheticDataset(SampleDataset):
    """A domain split as :class:`Sample` records (image H x W x 3 uint8, mask H x W bool), all
    generated on construction. ``sample.name`` is ``"<domain>/<split>/<index>"``."""

    def __init__(self, name: str, split: str, count: int, size: int = 256) -> None:
        images, masks = domain_split(name, split, count, size)
        self.name, self.split = name, split
        self.images = images.permute(0, 2, 3, 1).to(torch.uint8).numpy()
        self.masks = masks.numpy()

    def __len__(self) -> int:
        return len(self.images)

    def _load(self, index: int) -> Sample:
        return Sample(self.images[index], self.masks[index], f"{self.name}/{self.split}/{index}")


def preview_grid(names: Sequence[str], per_domain: int = 4, size: int = 128) -> np.ndarray:
    """Test-split samples, one domain per row, mask outlines in red: H x W x 3 uint8."""
    gap = 4
    rows = []
    for name in names:
        images, masks = domain_split(name, "test", per_domain, size)
        m = masks.float().unsqueeze(1)
        inner = -F.max_pool2d(-m, 3, 1, 1)  # erosion: outline = mask minus its eroded self
        outline = (m - inner)[:, 0] > 0
        images = images.permute(0, 2, 3, 1).clone()
        images[outline] = torch.tensor([255.0, 0.0, 0.0])
        tiles = [F.pad(img.permute(2, 0, 1), (0, gap, 0, gap), value=255.0) for img in images]
        rows.append(torch.cat(tiles, 2))
    grid = torch.cat(rows, 1).permute(1, 2, 0)
    return grid.to(torch.uint8).numpy()
