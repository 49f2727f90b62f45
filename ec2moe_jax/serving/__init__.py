"""Real end-cloud serving: a gRPC cloud server (continuous batching over KV slots, bounded
admission, health, Stats and Prometheus metrics), the end client (end layers and codec here,
reconnect and replay), the protocol (``ec2moe.proto``, tensors as checksummed wire payloads)
and a link-shaping relay for tests and benchmarks.

Importing this package starts neither JAX nor gRPC servers; see :mod:`.launch` (the server
process), :mod:`.client` (the end), :mod:`.relay`.
"""
