"""tiergate's HTTP face: app factory, request pipeline, proxying, logging, metrics and CLI."""
