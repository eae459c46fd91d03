"""regcl: continual adaptation of Segment Anything with LoRA adapters merged by RegMean.

The library imports nothing heavy at package import; import the submodules you need
(``regcl.models``, ``regcl.merging``, ``regcl.routing``, ``regcl.adapters``, ``regcl.data``,
...), and ``regcl.client`` for the service's HTTP client.
"""

from regcl.errors import (
    AdapterError,
    CancelledError,
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    DataError,
    MergeError,
    RegclError,
    RoutingError,
    StatsError,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "CancelledError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "DataError",
    "MergeError",
    "RegclError",
    "RoutingError",
    "StatsError",
    "__version__",
]
