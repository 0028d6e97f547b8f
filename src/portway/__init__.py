"""Portway: self-hosted HTTP and WebSocket tunnels."""

__version__ = "0.1.0"
__all__ = ["__version__"]
