"""Sharded, resumable sampling jobs: a JSONL manifest of requests -> one output folder per item.

`manifest` parses and validates the requests; `job` batches them by compiled program and runs
them data-parallel over every device of every process (`codi-jax sample`).
"""
