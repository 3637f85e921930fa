"""The Valkey cluster fixture's launcher, which lives in bench/valkey.py (the benchmarks start one
too, and bench/ imports nothing from tests/)."""

from bench.valkey import NUM_MASTERS, READY_S, ValkeyCluster, binaries, has_valkey

__all__ = ["NUM_MASTERS", "READY_S", "ValkeyCluster", "binaries", "has_valkey"]
