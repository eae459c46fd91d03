"""The router's default thresholds (no torch: the settings and the API import them).

A route is taken when the best domain leads the runner-up by at least :data:`DEFAULT_MIN_MARGIN`
and its novelty is at most :data:`DEFAULT_MAX_NOVELTY` (:func:`regcl.routing.decide`).
"""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_DIVERGENCE", "DEFAULT_MAX_NOVELTY", "DEFAULT_MIN_MARGIN"]

# Chosen from `regcl bench cl --route-only --domains long --probes source --seeds 3
# --first-seed 10` (docs/benchmarks.md, "Domain routing"): seeds the benchmark's tables do not
# use; 10 domains, 1920 test images, 15 routed to a wrong domain.
DEFAULT_MIN_MARGIN = 0.05
"""Smallest lead (score units: nats per token and feature) of the best domain over the
runner-up for the route to be taken. Measured: it turns away 40 % of the wrong routes (their
median margin is 0.09) and 0.1 % of the right ones (5 % of right routes lead by < 0.34)."""
DEFAULT_MAX_NOVELTY = 3.0
"""Largest novelty (mean squared Mahalanobis distance per feature under the best domain) for
the route to be taken. Measured: 99.7 % of in-domain test images are below it (median 0.75),
81 % of source-domain scenes (no adapter's domain; median 7.0) above it."""
DEFAULT_MAX_DIVERGENCE = 2.5
"""The served router's (:class:`~regcl.routing.compact.CompactRouter`) largest novelty for the
route to be taken: half the image's mean squared Mahalanobis distance per feature minus 1,
plus its log-volume gap to the domain (weight 2). From `regcl bench route` (docs/benchmarks.md,
"A router that scales"): on its calibration seeds (10-12) the threshold that lets 95 % of the
trained domains' test images through to the right domain is 2.82, where 89 % of the images of
unseen domains fall back; 2.5 is stricter: on the table's seeds it takes 96 % of the trained
images to the right domain and sends 95 % of the unseen ones to live."""
