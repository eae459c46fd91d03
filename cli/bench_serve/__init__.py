"""``regcl bench serve``: the service over HTTP against segment-anything's ``SamPredictor`` in
the same run (see :mod:`cli.bench_serve.run`)."""

from cli.bench_serve.config import ServeBenchConfig
from cli.bench_serve.run import run_serve_benchmark, serve_markdown

__all__ = ["ServeBenchConfig", "run_serve_benchmark", "serve_markdown"]
