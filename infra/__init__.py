"""Shared platform of the regcl service and workers: settings, Redis, artifacts, jobs, registry.

Modules (import the one you need; nothing is loaded or connected at import time):

- :mod:`infra.settings`: ``Settings`` from ``REGCL_*`` environment variables;
- :mod:`infra.redis_server`: a real, persistent ``redis-server`` child (``regcl up``, tests);
- :mod:`infra.redis_client`: ``connect(url)``, the one way to open a client;
- :mod:`infra.platform`: ``connect_platform(settings)``, the clients a process shares (Redis,
  artifact store, registry, jobs, datasets), built in one place;
- :mod:`infra.base_model`: the base-model rule (an artifact made on another base is refused);
- :mod:`infra.keys`: every Redis key and channel name;
- :mod:`infra.artifacts`: ``ArtifactStore``, immutable artifacts over fsspec, written atomically;
  keys and manifests in :mod:`infra.artifact_files`; reaching a store that may be away or slow
  (retries, deadlines) in :mod:`infra.store_reach`;
- :mod:`infra.jobs`: ``JobStore``, job records, state machine and progress events;
- :mod:`infra.registry`: ``Registry``, domain adapters, merged versions, live pointer, merge lock;
- :mod:`infra.live`: the live-version listener thread behind ``Registry.subscribe_live``;
- :mod:`infra.errors`: ``NotFound``, ``Conflict``, ``InvalidName``, ... (all ``RegclError``).
"""
