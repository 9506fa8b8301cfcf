"""Launchers: start a run's ranks (and, later, its finalize job) on some cluster."""
