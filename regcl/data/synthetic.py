"""Deterministic synthetic scenes: the *source* domain the tiny SAM is pretrained on, and the
primitives (shapes, textures) the target domains in :mod:`regcl.data.domains` are built from.

Everything is vectorised in torch over a batch of scenes, so generation costs far less than a
training step. Determinism: a split is generated in chunks of :data:`CHUNK` scenes, chunk ``k``
from a generator seeded by ``(seed, k)``, so sample ``i`` is the same whatever batch size reads it.

Tensors: images B x 3 x S x S float32 in [0, 255]; masks B x S x S bool.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CHUNK = 64


def coordinate_grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in [-1, 1]: (y, x), each S x S."""
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    return torch.meshgrid(axis, axis, indexing="ij")


def uniform(gen: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return torch.rand(shape, generator=gen) * (high - low) + low


def shape_masks(
    gen: torch.Generator,
    batch: int,
    size: int,
    *,
    center_range: float = 0.55,
    scale: tuple[float, float] = (0.15, 0.45),
    aspect: tuple[float, float] = (0.45, 1.0),
    log_power: tuple[float, float] = (math.log(0.9), math.log(8.0)),
    wobble: tuple[float, float] = (0.0, 0.25),
    harmonics: int = 5,
) -> torch.Tensor:
    """Random closed shapes, B x S x S bool.

    A rotated superellipse ``|x/a|^p + |y/b|^p <= r(θ)^p`` covers diamonds (p≈1), ellipses
    (p=2) and rounded rectangles (p≫2); ``r(θ) = 1 + Σ_k c_k cos(kθ + φ_k)`` adds blob-like,
    irregular outlines (lesions, polyps, camouflaged animals).
    """
    yy, xx = coordinate_grid(size)
    center = uniform(gen, (batch, 2, 1, 1), -center_range, center_range)
    radius = uniform(gen, (batch, 1, 1), *scale)
    ratio = uniform(gen, (batch, 1, 1), *aspect)
    angle = uniform(gen, (batch, 1, 1), 0, math.pi)
    power = torch.exp(uniform(gen, (batch, 1, 1), *log_power))
    dx, dy = xx - center[:, 0], yy - center[:, 1]
    cos, sin = torch.cos(angle), torch.sin(angle)
    u = (dx * cos + dy * sin) / radius
    v = (-dx * sin + dy * cos) / (radius * ratio)
    theta = torch.atan2(v, u)
    amp = uniform(gen, (batch, harmonics, 1, 1), *wobble) / torch.arange(
        1, harmonics + 1
    ).view(1, -1, 1, 1)
    phase = uniform(gen, (batch, harmonics, 1, 1), 0, 2 * math.pi)
    k = torch.arange(2, harmonics + 2, dtype=torch.float32).view(1, -1, 1, 1)
    r = 1 + (amp * torch.cos(k * theta.unsqueeze(1) + phase)).sum(1)
    level = (u.abs() ** power + v.abs() ** power) ** (1 / power)
    return level <= r.clamp(min=0.3)


def smooth_noise(gen: torch.Generator, batch: int, size: int, channels: int = 1,
                 cells: tuple[int, int] = (4, 16)) -> torch.Tensor:
    """Low-frequency noise, B x C x S x S, roughly unit variance: a random coarse grid
    (cells x cells, cells drawn once per batch) upsampled bicubically."""
    n = int(torch.randint(cells[0], cells[1] + 1, (1,), generator=gen))
    coarse = torch.randn((batch, channels, n, n), generator=gen)
    return F.interpolate(coarse, (size, size), mode="bicubic", align_corners=False)


def stripes(gen: torch.Generator, batch: int, size: int,
            frequency: tuple[float, float] = (3.0, 14.0)) -> torch.Tensor:
    """Oriented sinusoidal stripes in [-1, 1], B x 1 x S x S."""
    yy, xx = coordinate_grid(size)
    angle = uniform(gen, (batch, 1, 1), 0, math.pi)
    freq = uniform(gen, (batch, 1, 1), *frequency)
    phase = uniform(gen, (batch, 1, 1), 0, 2 * math.pi)
    proj = xx * torch.cos(angle) + yy * torch.sin(angle)
    return torch.sin(proj * freq * math.pi + phase).unsqueeze(1)


def random_texture(gen: torch.Generator, batch: int, size: int) -> torch.Tensor:
    """A per-scene mix of blotches and stripes, B x 1 x S x S, roughly in [-1, 1]."""
    mix = torch.rand((batch, 1, 1, 1), generator=gen)
    return mix * smooth_noise(gen, batch, size, cells=(6, 24)) + (1 - mix) * stripes(
        gen, batch, size
    )


def random_colours(gen: torch.Generator, batch: int) -> torch.Tensor:
    """B x 3 x 1 x 1 colours in [0, 255]."""
    return torch.rand((batch, 3, 1, 1), generator=gen) * 255


def contrasting_colours(gen: torch.Generator, base: torch.Tensor,
                        distance: tuple[float, float] = (45.0, 160.0)) -> torch.Tensor:
    """Colours at a random distance from ``base`` (B x 3 x 1 x 1), clipped to [0, 255]."""
    direction = F.normalize(torch.randn(base.shape, generator=gen), dim=1)
    step = uniform(gen, (base.shape[0], 1, 1, 1), *distance)
    colour = base + direction * step
    # A clipped colour can land near the base again; reflect instead so contrast survives.
    colour = torch.where(colour > 255, 2 * base - colour, colour)
    colour = torch.where(colour < 0, 2 * base - colour, colour)
    return colour.clamp(0, 255)


def pick_target(visible: torch.Tensor, gen: torch.Generator, min_fraction: float) -> torch.Tensor:
    """Choose one object per scene among K visible masks (B x K x S x S): a random one among
    those covering at least ``min_fraction`` of the image, else the largest. Returns B x S x S."""
    area = visible.flatten(2).float().mean(-1)
    ok = area >= min_fraction
    score = torch.rand(area.shape, generator=gen) + ok.float() * 2 + area * 1e-3
    index = score.argmax(1)
    return visible[torch.arange(visible.shape[0]), index]


def source_scenes(gen: torch.Generator, batch: int, size: int = 256,
                  max_objects: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The source domain: 1–3 shapes in flat or textured contrasting colours, occluding each
    other, on a textured background with noise and a lighting gradient.

    Returns images B x 3 x S x S float in [0, 255] and the visible mask of one object, B x S x S.
    """
    yy, xx = coordinate_grid(size)
    bg = random_colours(gen, batch)
    image = bg + uniform(gen, (batch, 1, 1, 1), 0, 45) * random_texture(gen, batch, size)
    gradient = uniform(gen, (batch, 2, 1, 1), -30, 30)
    image = image + gradient[:, :1] * xx + gradient[:, 1:] * yy
    masks = []
    active = torch.rand((batch, max_objects), generator=gen) < 0.6
    active[:, 0] = True
    for k in range(max_objects):
        mask = shape_masks(gen, batch, size) & active[:, k].view(-1, 1, 1)
        colour = contrasting_colours(gen, bg)
        fill = colour + uniform(gen, (batch, 1, 1, 1), 0, 25) * random_texture(gen, batch, size)
        image = torch.where(mask.unsqueeze(1), fill, image)
        masks.append(mask)
    stack = torch.stack(masks, 1)
    # Visible part of object k: not covered by any object drawn after it.
    covered = torch.zeros_like(stack)
    for k in range(max_objects - 2, -1, -1):
        covered[:, k] = covered[:, k + 1] | stack[:, k + 1]
    visible = stack & ~covered
    target = pick_target(visible, gen, min_fraction=0.01)
    image = image + torch.randn(image.shape, generator=gen) * uniform(gen, (batch, 1, 1, 1), 1, 10)
    return image.clamp(0, 255).round(), target


def chunked(generate, seed: int, start: int, count: int, size: int) -> tuple[torch.Tensor, ...]:
    """Samples ``start .. start+count-1`` of the deterministic stream of ``generate(gen, batch,
    size)``, generated chunk by chunk so each sample is independent of how it is read."""
    parts: list[tuple[torch.Tensor, ...]] = []
    first, last = start // CHUNK, (start + count - 1) // CHUNK
    for chunk in range(first, last + 1):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
        out = generate(gen, CHUNK, size)
        lo = max(start - chunk * CHUNK, 0)
        hi = min(start + count - chunk * CHUNK, CHUNK)
        parts.append(tuple(t[lo:hi] for t in out))
    return tuple(torch.cat(ts) for ts in zip(*parts))
