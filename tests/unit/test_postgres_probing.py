"""Which imports look up existing resources before they write (PostgreSQL store): the
ones that met one, at most ``_Probing.LIMIT`` of them, the oldest forgotten first."""

from __future__ import annotations

from datastore.postgres.resources import _Probing


def test_an_import_that_met_a_resource_is_remembered_and_the_oldest_forgotten() -> None:
    probing = _Probing()
    assert not probing.wanted("imp-0")
    for n in range(_Probing.LIMIT + 1):
        probing.add(f"imp-{n}")
    probing.add(f"imp-{_Probing.LIMIT}")  # again: still one entry
    assert not probing.wanted("imp-0")  # forgotten: its next block meets one once more
    assert all(probing.wanted(f"imp-{n}") for n in range(1, _Probing.LIMIT + 1))
    assert len(probing._jobs) == _Probing.LIMIT
