"""Readiness: prerequisite rules grouped in platform profiles, producing findings with remedies."""
