"""Dev tooling, not the product: local clusters of processes on loopback (``cluster``: shard nodes;
``local_raft``: bare counter replicas), the demo, the workload generator, and the counter app the Raft
tests and benchmark run (``counter_app``). The product modules never import this package."""
