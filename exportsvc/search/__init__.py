"""FHIR search for ``_typeFilter`` and the ``_elements`` subset (Bulk Data export).

- :mod:`.model` — a parsed ``_typeFilter`` as stored in the export request;
- :mod:`.parse` — kick-off strings to that model, refusing what is not supported;
- :mod:`.values` — FHIR search value syntax: date ranges, tokens, escaped commas;
- :mod:`.matcher` — a compiled filter: a predicate over parsed resources (via the
  R4 search parameter definitions and :mod:`exportsvc.fhir.fhirpath`), plus what of it
  the store can evaluate on its indexed columns;
- :mod:`.elements` — ``_elements``: keep the listed root elements and tag SUBSETTED.
"""
