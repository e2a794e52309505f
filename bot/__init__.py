"""Parley core: everything between a platform and a model, knowing nothing of either."""
