"""Imaging shifts that turn each synthetic target domain into a second one of its family.

A *look* re-renders a domain's finished images as another imaging device would see the same
scenes: the masks are unchanged, the appearance cues an adapter learns are not. Each shift
breaks a different cue of its family (:mod:`regcl.data.domains` registers the shifted domains):

- ``nbi``: narrow-band-imaging colours (channels remixed towards teal and brown), so the
  polyp's *redness* is no longer the cue.
- ``night``: low light (a third of the brightness, blue cast, strong sensor noise), so the
  camouflaged animal's faint texture seam sinks into noise.
- ``aerial``: grey, hazy, low-contrast aerial photographs: the shadow's *bluish* tint is gone
  and its darkening is halved.
- ``uv``: Wood's-lamp fluorescence (luminance inverted into violet): lesions turn *bright* on
  dark skin instead of dark on light.
- ``thermal``: inverted grey, blurred thermal images: the patterns' fine contrast is softened.

A look is ``(gen, images B x 3 x S x S) -> images``; it draws its per-scene jitter from the same
generator after the base domain has drawn everything, so sample i stays independent of how many
are read. Outputs are rounded integers in [0, 255], like every domain's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Look = Callable[[torch.Generator, Tensor], Tensor]
Generate = Callable[[torch.Generator, int, int], tuple[Tensor, Tensor]]

_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def _scene(gen: torch.Generator, batch: int, low: float, high: float) -> Tensor:
    """One uniform value per scene, B x 1 x 1 x 1."""
    return low + (high - low) * torch.rand((batch, 1, 1, 1), generator=gen)


def _grey(images: Tensor) -> Tensor:
    """Luminance, B x 1 x S x S."""
    return (images * _LUMA).sum(1, keepdim=True)


def _noise(gen: torch.Generator, images: Tensor, sigma: tuple[float, float]) -> Tensor:
    scale = _scene(gen, images.shape[0], *sigma)
    return images + torch.randn(images.shape, generator=gen) * scale


def nbi(gen: torch.Generator, images: Tensor) -> Tensor:
    """Narrow-band imaging: out = M · rgb with M jittered ±10 % per scene (red feeds blue and
    green, green feeds red), then a contrast stretch around the scene mean."""
    mix = torch.tensor([[0.05, 0.60, 0.10], [0.45, 0.15, 0.30], [0.55, 0.30, 0.05]])
    batch = images.shape[0]
    jitter = 1 + 0.1 * (2 * torch.rand((batch, 3, 3), generator=gen) - 1)
    out = torch.einsum("bij,bjhw->bihw", mix * jitter, images)
    mean = out.mean((1, 2, 3), keepdim=True)
    out = mean + (out - mean) * _scene(gen, batch, 1.3, 1.7)
    return _noise(gen, out, (1, 4)).clamp(0, 255).round()


def night(gen: torch.Generator, images: Tensor) -> Tensor:
    """Low light: brightness x0.25–0.4 with a blue cast, a dark floor, strong sensor noise."""
    batch = images.shape[0]
    cast = torch.tensor([0.80, 0.90, 1.25]).view(1, 3, 1, 1)
    out = 6 + images * cast * _scene(gen, batch, 0.25, 0.4)
    return _noise(gen, out, (5, 10)).clamp(0, 255).round()


def aerial(gen: torch.Generator, images: Tensor) -> Tensor:
    """Grey aerial photograph: luminance, haze (x0.45–0.65 plus 60–90), a faint warm tint."""
    batch = images.shape[0]
    grey = _grey(images) * _scene(gen, batch, 0.45, 0.65) + _scene(gen, batch, 60, 90)
    tint = torch.tensor([1.0, 0.98, 0.94]).view(1, 3, 1, 1)
    return _noise(gen, grey * tint, (1, 4)).clamp(0, 255).round()


def uv(gen: torch.Generator, images: Tensor) -> Tensor:
    """Wood's lamp: inverted luminance in violet (dark skin, bright lesions), gamma 0.8–1.2."""
    batch = images.shape[0]
    v = (255 - _grey(images)).clamp(0, 255) / 255
    v = v ** _scene(gen, batch, 0.8, 1.2)
    violet = torch.tensor([150.0, 70.0, 230.0]).view(1, 3, 1, 1)
    out = 15 + v * violet * _scene(gen, batch, 0.85, 1.1)
    return _noise(gen, out, (1, 4)).clamp(0, 255).round()


def thermal(gen: torch.Generator, images: Tensor) -> Tensor:
    """Thermal camera: inverted grey, blurred (Gaussian σ = S/200), contrast x0.5–0.7."""
    batch, _, size, _ = images.shape
    v = 255 - _grey(images)
    sigma = max(size / 200, 0.3)
    radius = max(1, round(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    v = F.pad(v, (radius,) * 4, mode="replicate")
    v = F.conv2d(v, kernel.view(1, 1, 1, -1))
    v = F.conv2d(v, kernel.view(1, 1, -1, 1))
    mean = v.mean((2, 3), keepdim=True)
    v = mean + (v - mean) * _scene(gen, batch, 0.5, 0.7)
    return _noise(gen, v.expand(-1, 3, -1, -1), (1, 3)).clamp(0, 255).round()


def shifted(generate: Generate, look: Look) -> Generate:
    """The domain ``generate`` seen through ``look`` (same scenes and masks, new appearance)."""

    def generate_shifted(gen: torch.Generator, batch: int, size: int) -> tuple[Tensor, Tensor]:
        images, masks = generate(gen, batch, size)
        return look(gen, images), masks

    generate_shifted.__name__ = f"{generate.__name__}_{look.__name__}"
    return generate_shifted
