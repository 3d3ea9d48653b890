"""``exportsvc seed``'s pipeline: the producer process's batches end up in the store as
exactly the versions the generator's resources make, on every backend."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from datastore.resources import ExportQuery, ResourceStore
from datastore.versioning import new_version
from exportsvc.fhir.compartment import patient_ids
from exportsvc.seed import generate
from exportsvc.seeding import seed_store

PATIENTS = 30
SEED = 5


async def test_seeded_store_holds_each_generated_resource_once_as_version_1(
    resources: ResourceStore,
) -> None:
    created = await seed_store(resources, PATIENTS, SEED)

    expected = {(r["resourceType"], r["id"]): r for r in generate(PATIENTS, seed=SEED)}
    assert created == len(expected)
    stored = [v async for v in resources.scan_versions()]
    assert len(stored) == len(expected)
    now = datetime.now(UTC)
    for version in stored:
        resource = expected[(version.type, version.id)]
        assert version.version == 1
        assert not version.deleted
        assert version.next_seq is None
        # the same bytes the store's own write path would have made of the resource
        same = new_version(resource, None, now, keep_last_updated=True)
        assert same is not None
        assert version.raw == same.raw
        assert version.last_updated == same.last_updated
        assert orjson.loads(version.raw)["meta"]["lastUpdated"] == resource["meta"]["lastUpdated"]


async def test_seeded_compartments_match_the_patient_compartment_definition(
    resources: ResourceStore,
) -> None:
    await seed_store(resources, PATIENTS, SEED)
    snapshot = await resources.current_seq()
    data = list(generate(PATIENTS, seed=SEED))
    patient = next(r["id"] for r in data if r["resourceType"] == "Patient")

    for type_ in ("Patient", "Observation", "Encounter", "Practitioner"):
        query = ExportQuery(type=type_, snapshot_seq=snapshot, compartment=True, patients=[patient])
        page = await resources.page(query, 0, 100_000)
        found = {orjson.loads(raw)["id"] for raw in page.raws}
        assert found or type_ == "Practitioner"  # in no Patient's compartment
        assert found == {
            r["id"] for r in data if r["resourceType"] == type_ and patient in patient_ids(r)
        }
