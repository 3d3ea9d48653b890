"""What a Provenance points at, and which of two is more recent: pure helpers."""

from __future__ import annotations

from exportsvc.fhir.provenance import recency, targets


def test_targets_in_every_reference_form() -> None:
    provenance = {
        "resourceType": "Provenance",
        "target": [
            {"reference": "Patient/p1"},
            {"reference": "Observation/o1/_history/3"},
            {"reference": "https://other.example/fhir/Encounter/e1"},
            {"reference": "#contained"},
            {"reference": "urn:uuid:0d3c6e5a-0000-4000-8000-000000000000"},
            {"reference": "NotAType/x"},
            {"display": "no reference"},
        ],
    }
    assert targets(provenance) == {("Patient", "p1"), ("Observation", "o1"), ("Encounter", "e1")}
    assert targets({"resourceType": "Provenance"}) == frozenset()


def test_recency_orders_by_recorded_then_last_updated_then_id() -> None:
    def provenance(id_: str, recorded: str, updated: str) -> dict[str, object]:
        return {"id": id_, "recorded": recorded, "meta": {"lastUpdated": updated}}

    early = provenance("z", "2024-01-01T00:00:00Z", "2025-01-01T00:00:00Z")
    late = provenance("a", "2024-01-01T01:00:00+00:00", "2024-01-01T01:00:00Z")
    same_later_update = provenance("a", "2024-01-01T01:00:00Z", "2024-02-01T00:00:00Z")
    same_higher_id = provenance("b", "2024-01-01T01:00:00Z", "2024-02-01T00:00:00Z")
    unreadable = provenance("y", "yesterday", "2024-01-01T00:00:00Z")
    ordered = [unreadable, early, late, same_later_update, same_higher_id]
    assert sorted(reversed(ordered), key=recency) == ordered
