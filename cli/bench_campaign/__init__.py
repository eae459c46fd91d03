"""``regcl bench campaign``: simulated annotators label Label Studio projects through the
service's ``/labelstudio`` routes over HTTP, one project per domain in sequence, and the clicks
they need are counted (issue #22). See :mod:`cli.bench_campaign.run`."""

from cli.bench_campaign.config import CampaignConfig
from cli.bench_campaign.run import run_campaign

__all__ = ["CampaignConfig", "run_campaign"]
