"""Snapshots, recovery and health monitoring (see the fault-tolerance issue)."""
