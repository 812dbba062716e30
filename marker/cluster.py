"""A local Marker group: N ``zwallet marker`` replicas on loopback (dev tooling: ``zwallet up``, the tests
and the benchmarks; see engine/devtools/cluster.py)."""
from __future__ import annotations

from typing import Any

from engine.devtools.cluster import ServiceCluster


class MarkerCluster(ServiceCluster):
    module = "marker.server"
    file_prefix = "marker"
    client_key_name = "marker"        # the Marker reaches the shards with the system's marker key

    def config_class(self) -> Any:
        from marker.server import MarkerConfig
        return MarkerConfig

    def __init__(self, size: int, base_dir: str, system_path: str, **settings: Any) -> None:
        super().__init__(size, base_dir, system=system_path, **settings)
