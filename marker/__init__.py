"""zwallet transaction layer: cross-shard workflows (TCC transfers, sagas) coordinated by a Raft-replicated
state machine (``marker.workflow.MarkerMachine``) and driven by the leader (``marker.job_driver.JobDriver``).
Both are pure cores: no I/O, no clock, no randomness; the ZeroMQ shell and client live beside them."""

from marker.client import AsyncClient, Client, Subscriber, WorkflowPending, WorkflowRefused, WorkflowResult

__all__ = ["AsyncClient", "Client", "Subscriber", "WorkflowPending", "WorkflowRefused", "WorkflowResult"]
