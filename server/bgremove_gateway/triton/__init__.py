"""Triton: the client, the pool of replicas, target resolution, the embedded process and its
supervisor, and the serving-graph builder."""
