"""floydd: serve uploaded model code from Docker containers on one GPU box."""

__version__ = "0.1.0"
