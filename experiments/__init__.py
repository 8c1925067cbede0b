"""Wiring of the toolkit: the runner, presets, evaluation, tables and benchmarks."""
