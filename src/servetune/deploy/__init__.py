"""Deployment targets: where an engine process runs (local process group now; docker, kubernetes later)."""
