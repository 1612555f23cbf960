"""Admission between decision and dispatch: queues, windows and claims (issue #14)."""
