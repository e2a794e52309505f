"""Benchmarks: what Parley costs on top of the model and the platform, and how it grows with load.

Every benchmark is one command (`python -m bench.overhead`, `bench.concurrency`, `bench.redis_turn`,
`bench.profile`), runs against loopback fakes and prints plain tables. See docs/benchmarks.md.
"""
