"""A parsed ``_typeFilter``, as the export request stores it (plain data)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Criterion(BaseModel):
    """One search parameter of a query: ``name[:modifier]=v1,v2`` (values OR'd)."""

    name: str
    modifier: str | None = None
    values: list[str]
    """Each value unescaped (``\\,`` → ``,``), date prefixes still attached."""


class TypeFilter(BaseModel):
    """One ``Type?a=1&b=2`` query: a resource matches when every criterion does."""

    type: str
    criteria: list[Criterion] = Field(default_factory=list)
    query: str
    """The query as the client wrote it (after URL decoding), for messages."""
