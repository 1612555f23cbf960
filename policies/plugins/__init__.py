"""Routing plugins, one module each. Every module opens with its algorithm and parameters."""
