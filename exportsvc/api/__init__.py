"""The HTTP surface (aiohttp)."""

from exportsvc.api.app import create_app

__all__ = ["create_app"]
