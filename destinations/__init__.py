"""Export destinations: the commit contract and its implementations."""

from destinations.base import ExportDestinationClient, file_name
from destinations.factory import create_destination, default_secret

__all__ = ["ExportDestinationClient", "create_destination", "default_secret", "file_name"]
