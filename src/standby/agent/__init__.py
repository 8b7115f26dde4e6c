"""The agent: one process per hypervisor host (`standby agent run`). It receives
replication as a secondary (the replica store), replicates its VMs as a primary, and
works for the control plane, which it calls (never the other way round): heartbeats,
inventory, tasks. See docs/control-plane.md and `runtime.py`."""
