"""Protocol-faithful fake servers for tests."""
