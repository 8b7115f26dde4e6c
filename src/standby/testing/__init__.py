"""Test and benchmark fixtures that are real parts, not fakes: Linux network namespaces
as sites, and a user-space WAN proxy that adds latency (this kernel has no netem)."""
