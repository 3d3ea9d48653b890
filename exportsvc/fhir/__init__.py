"""FHIR R4 (4.0.1) reference data and pure helpers over it.

The data lives in ``data/*.json`` and is read with :mod:`importlib.resources`, once, when a
module that needs it is imported.
"""
