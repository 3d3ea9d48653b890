"""Export destinations: the commit contract and its implementations."""

from destinations.base import ExportDestinationClient, file_name
from destinations.factory import DestinationFactory

__all__ = ["DestinationFactory", "ExportDestinationClient", "file_name"]
