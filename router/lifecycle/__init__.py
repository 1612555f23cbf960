"""The request lifecycle as plain code over ports, run by the live gateway and by `tiergate replay`."""
