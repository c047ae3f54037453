"""Quiesce: a Kubernetes worker that runs webhook-created jobs in-process and drains correctly."""

__version__ = "0.1.0"
