"""Benchmarks against the anchors (transformers + PEFT); scripts, not tests. `make bench` runs them all."""
