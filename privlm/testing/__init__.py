"""Helpers shared by the tests and the benchmarks: tiny random checkpoints of every supported
architecture, and running requests through a real engine."""
