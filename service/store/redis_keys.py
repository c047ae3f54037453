"""Where the Redis store keeps things, on one server and on Redis Cluster.

Everything of one run carries the hash tag ``{run_id}`` (one slot), so each Lua
script touches a single slot. What differs on a cluster:

* the lease index (worker id → lease expiry) is split into ``LEASE_SHARDS`` sorted
  sets ``quiesce:{workers:<n>}``, a worker's lease in the shard its id hashes to, so
  the renewals of many replicas and the reaper's scans spread over several nodes
  instead of one hot slot; the reaper reads every shard in one pipelined pass;
* notifications use sharded Pub/Sub (``SPUBLISH``): a run's event channel carries
  the run's tag and a worker's cancel channel the worker's tag, so a message goes
  to the one node that owns the slot, not to every node of the cluster.

On one server the names are those the store has always used.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Final

WORKERS_KEY: Final = "quiesce:workers"
GENERATION_KEY: Final = "quiesce:generation"
EVENTS_CHANNEL_PREFIX: Final = "quiesce:events:"
CANCEL_CHANNEL_PREFIX: Final = "quiesce:cancel:"
#: Lease index shards on a cluster: a handful of slots, so a reaper pass stays one
#: small pipeline while renewals spread over (up to) as many nodes.
LEASE_SHARDS: Final = 8


def run_key(run_id: str) -> str:
    return f"quiesce:{{{run_id}}}:run"


def events_key(run_id: str) -> str:
    return f"quiesce:{{{run_id}}}:events"


def worker_runs_key(worker_id: str) -> str:
    return f"quiesce:{{worker:{worker_id}}}:runs"


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """The names that depend on the topology (see the module docstring)."""

    cluster: bool = False

    @property
    def publish(self) -> str:
        """The command the scripts notify with."""
        return "SPUBLISH" if self.cluster else "PUBLISH"

    def lease_keys(self) -> list[str]:
        if not self.cluster:
            return [WORKERS_KEY]
        return [f"quiesce:{{workers:{shard}}}" for shard in range(LEASE_SHARDS)]

    def lease_key(self, worker_id: str) -> str:
        if not self.cluster:
            return WORKERS_KEY
        shard = zlib.crc32(worker_id.encode()) % LEASE_SHARDS
        return f"quiesce:{{workers:{shard}}}"

    def events_channel(self, run_id: str) -> str:
        if not self.cluster:
            return EVENTS_CHANNEL_PREFIX + run_id
        return f"{EVENTS_CHANNEL_PREFIX}{{{run_id}}}"

    def cancel_channel(self, worker_id: str) -> str:
        if not self.cluster:
            return CANCEL_CHANNEL_PREFIX + worker_id
        return f"{CANCEL_CHANNEL_PREFIX}{{worker:{worker_id}}}"
