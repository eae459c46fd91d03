"""The work of ``regcl bench cl`` as jobs any process can run: train, evaluate, route.

A job's result depends only on its arguments and the run's :class:`~regcl.bench.cl.BenchConfig`
(every draw is seeded, and every process runs torch with the same number of threads), never on
which process runs it or what that process ran before. So a run gives bit-identical numbers with
one worker or several (``tests/test_bench.py`` checks it).

What a bench *seed* s fixes: the data (samples ``s·N .. s·N+N−1`` of each domain's train and test
splits), the adapters' initial weights (:func:`~regcl.adapters.seeded_lora_init` with s), the
training prompts and batch order (``TrainConfig.seed = s``) and the evaluation prompts (seed s).

The frozen encoder blocks before the first adapted one are run once per (seed, domain, split)
and cached: nothing before the adapter changes during training or evaluation, and no
augmentation is used, so this is exact.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from regcl.adapters.lora import adapter_weights, attach_lora, load_weights_into, seeded_lora_init
from regcl.data.domains import domain_split
from regcl.models.build import TINY_CHECKPOINT, build_sam
from regcl.routing import DomainRouter, first_layer_moments
from regcl.training.adapter import (
    click_curves_prefix,
    encoder_prefix_cache,
    evaluate_prefix_per_image,
    first_adapted_block,
    gram_stats_from_prefix,
    train_adapter,
)

if TYPE_CHECKING:
    from regcl.bench.cl_config import BenchConfig

logger = logging.getLogger(__name__)

Weights = dict[str, torch.Tensor]
PerImage = dict[str, dict[str, torch.Tensor]]  # domain -> metric -> N scores
_CACHE_ENTRIES = 24  # (seed, domain, split) prefixes kept per process (about 40 MB each)


@dataclass(frozen=True)
class SplitData:
    """One domain split of one seed, ready for the adapted tail of the encoder."""

    masks: torch.Tensor  # N x S x S bool
    prefix: torch.Tensor  # N x h x w x C, the frozen blocks' output


class BenchWorker:
    """One process's model and data cache; runs jobs (see :func:`run_job`)."""

    def __init__(self, config: BenchConfig) -> None:
        torch.set_num_threads(config.threads)
        self.config = config
        self.model: PeftModel = attach_lora(build_sam("tiny", config.checkpoint), config.adapter)
        self._cache: OrderedDict[tuple[int, str, str], SplitData] = OrderedDict()
        self.trained = TrainedCache(config) if config.cache_dir else None

    def reconfigured(self, config: BenchConfig) -> BenchWorker:
        """A worker for ``config`` sharing this one's model and data cache (for configs that
        differ only in training: the cached data and prefixes do not depend on it)."""
        worker = copy.copy(self)
        worker.config = config
        worker.trained = TrainedCache(config) if config.cache_dir else None
        return worker

    def data(self, seed: int, domain: str, split: str) -> SplitData:
        key = (seed, domain, split)
        if key not in self._cache:
            count = (self.config.train_per_domain if split == "train"
                     else self.config.test_per_domain)
            images, masks = domain_split(domain, split, count, start=seed * count)
            self._cache[key] = SplitData(masks, encoder_prefix_cache(self.model, images))
            while len(self._cache) > _CACHE_ENTRIES:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def train(self, seed: int, domain: str, start: Weights | None, *, with_stats: bool,
              identity: tuple | None = None) -> tuple[Weights, Weights | None]:
        """Trains from ``start`` (None: the seed's fresh init) on ``domain``; optionally also
        returns the Gram statistics of the trained adapter on that domain's training data.

        identity: what determines the result besides the config (e.g. the seed and the order
        of domains trained so far), the key of the on-disk cache when the config has one."""
        if self.trained is not None and identity is not None:
            hit = self.trained.get(identity)
            if hit is not None:
                return hit
        weights, stats = self._train(seed, domain, start, with_stats=with_stats)
        if self.trained is not None and identity is not None:
            self.trained.put(identity, weights, stats)
        return weights, stats

    def _train(self, seed: int, domain: str, start: Weights | None, *,
               with_stats: bool) -> tuple[Weights, Weights | None]:
        load_weights_into(self.model, seeded_lora_init(self.model, seed) if start is None
                          else start)
        data = self.data(seed, domain, "train")
        config = dataclasses.replace(self.config.train, seed=seed)
        t0 = time.monotonic()
        train_adapter(self.model, None, data.masks, config, prefix=data.prefix)
        logger.info("seed %d: trained on %s in %.1f s", seed, domain, time.monotonic() - t0)
        stats = gram_stats_from_prefix(self.model, data.prefix) if with_stats else None
        return adapter_weights(self.model), stats

    def evaluate(self, seed: int, weights: Weights | None) -> PerImage:
        """Per-image IoU / Dice / MAE on every domain's test split (None: the base model)."""
        if weights is None:
            weights = {k: torch.zeros_like(v) for k, v in adapter_weights(self.model).items()}
        load_weights_into(self.model, weights)
        scores: PerImage = {}
        for domain in self.config.domains:
            data = self.data(seed, domain, "test")
            scores[domain] = evaluate_prefix_per_image(self.model, data.prefix, data.masks,
                                                       seed=seed)
        return scores

    def clicks(self, seed: int, weights: Weights | None,
               subsets: dict[str, list[int] | None], max_clicks: int
               ) -> dict[str, dict[str, torch.Tensor]]:
        """The click protocol on test images of each domain in ``subsets`` (indices into
        its test split; None: all): per domain, ``feedback`` and ``points`` (IoU after each
        click, n x max_clicks, with and without mask feedback) and ``plain`` (n IoU with the
        plain protocol's 3 random positive points of this seed). None weights: the base."""
        if weights is None:
            weights = {k: torch.zeros_like(v) for k, v in adapter_weights(self.model).items()}
        load_weights_into(self.model, weights)
        out: dict[str, dict[str, torch.Tensor]] = {}
        for domain, indices in subsets.items():
            data = self.data(seed, domain, "test")
            pick = slice(None) if indices is None else torch.tensor(indices, dtype=torch.long)
            prefix, masks = data.prefix[pick], data.masks[pick]
            plain = evaluate_prefix_per_image(self.model, data.prefix, data.masks, seed=seed)
            out[domain] = {"plain": plain["iou"][pick]}
            for mode, feedback in (("feedback", True), ("points", False)):
                out[domain][mode] = click_curves_prefix(self.model, prefix, masks, max_clicks,
                                                        feedback=feedback)
        return out

    def route(self, seed: int, stats: dict[str, Weights]) -> dict[str, Any]:
        """Router scores of every test image against every domain (the router over all
        domains; a domain's score does not depend on the others, so a router over a subset
        scores as these columns)."""
        router = DomainRouter.from_stats(stats, ridge=self.config.route_ridge)
        block = self.model.base_model.model.image_encoder.blocks[first_adapted_block(self.model)]
        out: dict[str, Any] = {"domains": list(router.domains), "scores": {}, "novelty": {}}
        # The probes (domains no adapter was trained on, e.g. the source domain) measure how
        # images from nowhere score.
        for domain in dict.fromkeys((*self.config.domains, *self.config.route_probes)):
            second, first, _ = first_layer_moments(block, self.data(seed, domain, "test").prefix)
            scores, novelty = router.score_moments(second, first)
            out["scores"][domain], out["novelty"][domain] = scores, novelty
        return out


class TrainedCache:
    """Trained adapters on disk (``BenchConfig.cache_dir``), shared by runs whose training is
    the same: e.g. a ten-domain run reuses the five-domain run's adapters of the same seeds.

    The key hashes the job's identity with every setting that changes training (adapter and
    training config, data sizes, the base weights' bytes, torch threads and version); files
    are safetensors, written atomically. A run that must be reproduced from scratch is run
    without a cache.
    """

    def __init__(self, config: BenchConfig) -> None:
        self.root = Path(config.cache_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        checkpoint = Path(config.checkpoint) if config.checkpoint else TINY_CHECKPOINT
        self.setting = json.dumps({
            "adapter": dataclasses.asdict(config.adapter),
            "train": {k: v for k, v in dataclasses.asdict(config.train).items() if k != "seed"},
            "train_per_domain": config.train_per_domain,
            "weights": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
            "threads": config.threads, "torch": torch.__version__,
        }, sort_keys=True, default=str)
        self.hits = 0

    def _path(self, identity: tuple) -> Path:
        digest = hashlib.sha256((self.setting + repr(identity)).encode()).hexdigest()[:32]
        return self.root / f"{digest}.safetensors"

    def has(self, identity: tuple) -> bool:
        return self._path(identity).is_file()

    def get(self, identity: tuple) -> tuple[Weights, Weights | None] | None:
        path = self._path(identity)
        if not path.is_file():
            return None
        tensors = load_file(str(path))
        weights = {k[2:]: v for k, v in tensors.items() if k.startswith("w/")}
        stats = {k[2:]: v for k, v in tensors.items() if k.startswith("s/")} or None
        self.hits += 1
        logger.info("cache hit %s", identity)
        return weights, stats

    def put(self, identity: tuple, weights: Weights, stats: Weights | None) -> None:
        tensors = {f"w/{k}": v.contiguous() for k, v in weights.items()}
        tensors.update({f"s/{k}": v.contiguous() for k, v in (stats or {}).items()})
        path = self._path(identity)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata={"identity": repr(identity)})
        tmp.rename(path)


_WORKER: BenchWorker | None = None


def init_worker(config: BenchConfig) -> None:
    """Pool initializer: one :class:`BenchWorker` per process."""
    global _WORKER
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(processName)s %(message)s",
                        datefmt="%H:%M:%S")
    _WORKER = BenchWorker(config)


def run_indexed(item: tuple[int, tuple]) -> tuple[int, bytes]:
    """:func:`run_job` for a pool: ``(index, job) -> (index, result serialised)``. Results
    travel as ``torch.save`` bytes (read back with ``weights_only=True``), not as shared-memory
    tensors, whose file descriptors a long run would run out of."""
    index, job = item
    buffer = io.BytesIO()
    torch.save(run_job(job), buffer)
    return index, buffer.getvalue()


def run_job(job: tuple) -> Any:
    """Runs one job in this process's worker. Jobs:

    - ``("individual", seed, domain)`` -> (weights, stats) trained from the seed's init;
    - ``("chain", seed, order, start)`` -> weights after each of ``order[1:]`` trained in turn
      from ``start`` (sequential fine-tuning; ``start`` is order[0]'s individual adapter);
    - ``("evaluate", seed, weights | None)`` -> per-image scores on every domain;
    - ``("route", seed, {domain: stats})`` -> router scores of every test image;
    - ``("clicks", seed, weights | None, {domain: indices | None}, max_clicks)`` -> the click
      protocol's curves and the plain IoU on those test images (:meth:`BenchWorker.clicks`).
    """
    assert _WORKER is not None, "init_worker was not called in this process"
    return execute(_WORKER, job)


def execute(worker: BenchWorker, job: tuple) -> Any:
    kind, seed = job[0], job[1]
    if kind == "individual":
        return worker.train(seed, job[2], None, with_stats=True,
                            identity=("individual", seed, job[2]))
    if kind == "chain":
        order, weights, steps = tuple(job[2]), job[3], []
        for step, domain in enumerate(order[1:], start=2):
            weights, _ = worker.train(seed, domain, weights, with_stats=False,
                                      identity=("sequential", seed, order[:step]))
            steps.append(weights)
        return steps
    if kind == "evaluate":
        return worker.evaluate(seed, job[2])
    if kind == "route":
        return worker.route(seed, job[2])
    if kind == "clicks":
        return worker.clicks(seed, job[2], job[3], job[4])
    raise ValueError(f"unknown bench job {kind!r}")
