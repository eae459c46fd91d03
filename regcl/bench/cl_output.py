"""Writing a ``regcl bench cl`` report: the JSON (every matrix), the tables, the figure."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from regcl.bench.cl_report import (
    curves_table,
    markdown_table,
    per_domain_table,
    routing_table,
    sweep_table,
)

logger = logging.getLogger(__name__)


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as None (JSON has no infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def report_text(report: dict[str, Any]) -> str:
    """Every table of the report, as markdown."""
    parts = [markdown_table(report), per_domain_table(report)]
    if report.get("sweep"):
        parts.append(sweep_table(report))
    parts.append(routing_table(report))
    if report.get("orders"):
        parts.append(curves_table(report))
    seeds = report["config"]["seeds"]
    parts.append(f"{len(report['orders'])} order(s) x {len(seeds)} seed(s) {tuple(seeds)}, "
                 f"{len(report['config']['domains'])} domains, {report['elapsed_s']:.0f} s on "
                 f"{report['machine']}. {report['interval']}.")
    return "\n\n".join(parts)


def write_outputs(report: dict[str, Any], *, json_path: str | None = None,
                  figure_path: str | None = None,
                  text: Callable[[dict[str, Any]], str] | None = None) -> str:
    """Writes the JSON and the figure where asked; returns ``text(report)`` (default
    :func:`report_text`)."""
    if json_path:
        Path(json_path).write_text(json.dumps(jsonable(report), indent=1) + "\n")
        logger.info("wrote %s", json_path)
    if figure_path:
        from regcl.bench.cl_figure import sequence_figure

        sequence_figure(report, figure_path)
        logger.info("wrote %s", figure_path)
    return (text or report_text)(report)
