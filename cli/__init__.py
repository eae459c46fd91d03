"""The ``regcl`` command and its entry points: the command line (:mod:`cli.main`), ``regcl up``
(:mod:`cli.up`: Redis, a worker and the API in the foreground), ``regcl demo``
(:mod:`cli.demo`: the adaptation loop over HTTP through :class:`regcl.client.Client`) and
``regcl bench serve`` (:mod:`cli.bench_serve`).

The top of the layers: ``regcl`` ← ``infra`` ← ``workers`` ← ``service`` ← ``cli``. It may
import all of them; nothing imports it.
"""
