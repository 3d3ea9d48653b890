"""Deterministic synthetic FHIR R4 data shaped like Synthea's output.

:func:`generate` yields plain dicts: a pool of Organizations and Practitioners, then for
each Patient the Patient and its Encounters with their Conditions, Observations,
DiagnosticReports, Procedures, MedicationRequests and Immunizations (about 55 resources a
Patient, two thirds of them Observations) and one or two Provenance, then three person
Groups. A reference always points at a resource yielded before it.

The output depends only on the arguments: one ``random.Random(seed)`` makes every choice,
ids are UUID-4 strings drawn from it and times are offsets from ``now``. ``meta.lastUpdated``
falls in the five years before ``now``; a resource's clinical dates never follow it.

It is built for speed (seeding millions of resources): dates come from lookup tables and
the CodeableConcepts (``code``, ``category``, ``class``...) are shared between resources, so
do not change them in place; ``meta``, references and the rest are each resource's own.
"""

from __future__ import annotations

import gc
import pickle
import random
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO, Final

from datastore.versioning import new_version

__all__ = ["DEFAULT_NOW", "WINDOW", "generate"]

DEFAULT_NOW: Final = datetime(2026, 1, 1, tzinfo=UTC)
WINDOW: Final = timedelta(days=5 * 365)

Resource = dict[str, Any]
Concept = dict[str, Any]
_Test = tuple[Concept, str, float, float]  # code, UCUM unit, low, high
_Care = tuple[dict[str, str], dict[str, str]]  # serviceProvider, participant.individual

_SNOMED = "http://snomed.info/sct"
_LOINC = "http://loinc.org"
_HL7 = "http://terminology.hl7.org/CodeSystem/"
_SYNTHEA = "https://github.com/synthetichealth/synthea"


def _cc(system: str, code: str, display: str, text: bool = True) -> Concept:
    coding = [{"system": system, "code": code, "display": display}]
    return {"coding": coding, "text": display} if text else {"coding": coding}


def _rows(table: str) -> list[list[str]]:
    return [line.split(" | ") for line in table.strip().splitlines()]


def _codes(table: str) -> tuple[Concept, ...]:
    """CodeableConcepts from a code system's URL line, then ``code | display`` lines."""
    system, *rows = _rows(table)
    return tuple(_cc(system[0], code, display) for code, display in rows)


def _tests(table: str) -> tuple[_Test, ...]:
    """LOINC-coded quantitative tests from ``code | display | unit | low | high`` lines."""
    return tuple(
        (_cc(_LOINC, code, display), unit, float(low), float(high))
        for code, display, unit, low, high in _rows(table)
    )


_VITALS: Final = _tests("""
8302-2 | Body Height | cm | 150 | 195
29463-7 | Body Weight | kg | 45 | 120
39156-5 | Body mass index (BMI) [Ratio] | kg/m2 | 18 | 38
8867-4 | Heart rate | /min | 55 | 110
9279-1 | Respiratory rate | /min | 12 | 20
8480-6 | Systolic Blood Pressure | mm[Hg] | 100 | 160
8462-4 | Diastolic Blood Pressure | mm[Hg] | 60 | 100
8310-5 | Body temperature | Cel | 36.1 | 38.0
59408-5 | Oxygen saturation in Arterial blood by Pulse oximetry | % | 94 | 100
72514-3 | Pain severity - 0-10 verbal numeric rating [Score] - Reported | {score} | 0 | 10
""")
_METABOLIC: Final = _tests("""
2339-0 | Glucose [Mass/volume] in Blood | mg/dL | 65 | 140
6299-2 | Urea nitrogen [Mass/volume] in Blood | mg/dL | 7 | 20
38483-4 | Creatinine [Mass/volume] in Blood | mg/dL | 0.6 | 1.3
49765-1 | Calcium [Mass/volume] in Blood | mg/dL | 8.5 | 10.5
2947-0 | Sodium [Moles/volume] in Blood | mmol/L | 135 | 145
6298-4 | Potassium [Moles/volume] in Blood | mmol/L | 3.5 | 5.1
""")
_LIPIDS: Final = _tests("""
2093-3 | Cholesterol [Mass/volume] in Serum or Plasma | mg/dL | 150 | 280
2571-8 | Triglycerides | mg/dL | 50 | 250
18262-6 | Cholesterol in LDL [Mass/volume] in Serum or Plasma by Direct assay | mg/dL | 60 | 190
2085-9 | Cholesterol in HDL [Mass/volume] in Serum or Plasma | mg/dL | 30 | 90
""")
_PANELS: Final = (
    (_cc(_LOINC, "51990-0", "Basic metabolic panel - Blood"), _METABOLIC),
    (_cc(_LOINC, "57698-3", "Lipid panel with direct LDL - Serum or Plasma"), _LIPIDS),
)
_CONDITIONS: Final = _codes("""
http://snomed.info/sct
44054006 | Diabetes mellitus type 2 (disorder)
59621000 | Essential hypertension (disorder)
195662009 | Acute viral pharyngitis (disorder)
10509002 | Acute bronchitis (disorder)
444814009 | Viral sinusitis (disorder)
55822004 | Hyperlipidemia (disorder)
15777000 | Prediabetes (finding)
233604007 | Pneumonia (disorder)
162864005 | Body mass index 30+ - obesity (finding)
""")
_MEDICATIONS: Final = _codes("""
http://www.nlm.nih.gov/research/umls/rxnorm
314076 | lisinopril 10 MG Oral Tablet
197361 | amlodipine 5 MG Oral Tablet
860975 | 24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet
313782 | Acetaminophen 325 MG Oral Tablet
308182 | Amoxicillin 250 MG Oral Capsule
310965 | Ibuprofen 200 MG Oral Tablet
316672 | Simvastatin 10 MG Oral Tablet
849574 | Naproxen sodium 220 MG Oral Tablet
""")
_PROCEDURES: Final = _codes("""
http://snomed.info/sct
430193006 | Medication Reconciliation (procedure)
710824005 | Assessment of health and social care needs (procedure)
171207006 | Depression screening (procedure)
117015009 | Throat culture (procedure)
23426006 | Measurement of respiratory function (procedure)
399208008 | Plain chest X-ray (procedure)
73761001 | Colonoscopy (procedure)
""")
_VACCINES: Final = _codes("""
http://hl7.org/fhir/sid/cvx
140 | Influenza, seasonal, injectable, preservative free
113 | Td (adult) preservative free
115 | Tdap
121 | zoster
133 | Pneumococcal conjugate PCV 13
43 | Hep B, adult
208 | SARS-COV-2 (COVID-19) vaccine, mRNA, spike protein, LNP, preservative free, 30 mcg/0.3mL dose
""")
_ENCOUNTER_CLASSES: Final = {
    code: {"system": _HL7 + "v3-ActCode", "code": code, "display": display}
    for code, display in (("AMB", "ambulatory"), ("EMER", "emergency"), ("IMP", "inpatient"))
}
# class | type | shortest and longest stay in seconds; a repeated row weighs more
_ENCOUNTERS: Final = tuple(
    (_ENCOUNTER_CLASSES[klass], [_cc(_SNOMED, code, display)], int(shortest), int(longest))
    for klass, code, display, shortest, longest in _rows("""
AMB | 185349003 | Encounter for check up (procedure) | 900 | 3600
AMB | 185349003 | Encounter for check up (procedure) | 900 | 3600
AMB | 185345009 | Encounter for symptom (procedure) | 900 | 2700
AMB | 390906007 | Follow-up encounter (procedure) | 900 | 1800
AMB | 162673000 | General examination of patient (procedure) | 900 | 3600
EMER | 50849002 | Emergency room admission (procedure) | 3600 | 21600
IMP | 32485007 | Hospital admission (procedure) | 86400 | 432000
""")
)
_PPRF: Final = [_cc(_HL7 + "v3-ParticipationType", "PPRF", "primary performer", text=False)]
_VITAL_SIGNS: Final = [_cc(_HL7 + "observation-category", "vital-signs", "Vital signs", False)]
_LABORATORY: Final = [_cc(_HL7 + "observation-category", "laboratory", "Laboratory", False)]
_LAB: Final = [_cc(_HL7 + "v2-0074", "LAB", "Laboratory", text=False)]
_DIAGNOSIS: Final = [
    _cc(_HL7 + "condition-category", "encounter-diagnosis", "Encounter Diagnosis", False)
]
_CLINICAL: Final = {
    status: _cc(_HL7 + "condition-clinical", status, status.title(), text=False)
    for status in ("active", "resolved")
}
_CONFIRMED: Final = _cc(_HL7 + "condition-ver-status", "confirmed", "Confirmed", text=False)
_MRN: Final = _cc(_HL7 + "v2-0203", "MR", "Medical Record Number")
_PROVIDER: Final = [_cc(_HL7 + "organization-type", "prov", "Healthcare Provider")]
_GIVEN: Final = {
    "female": ("Maria", "Linda", "Aisha", "Emma", "Sofia", "Mei", "Olivia", "Grace", "Nia"),
    "male": ("James", "Carlos", "Wei", "Noah", "Omar", "Liam", "David", "Kwame", "Luca"),
}
_FAMILY: Final = ("Smith", "Garcia", "Nguyen", "Okafor", "Kowalski", "Rossi", "Haddad", "Tanaka")
_STREETS: Final = ("Main St", "Oak Ave", "Elm St", "Maple Dr", "Cedar Ln", "Park Rd")
_CITIES: Final = _rows("Boston | 02118\nWorcester | 01608\nSpringfield | 01103\nLowell | 01852")
_GENDERS: Final = ("female", "male")

_V4_CLEAR: Final = ~((0xF000 << 64) | (0xC000 << 48))
_V4_SET: Final = (0x4000 << 64) | (0x8000 << 48)
_CLOCK: Final = tuple(f"T{m // 60:02d}:{m % 60:02d}:" for m in range(1440))
_SECONDS: Final = tuple(f"{s:02d}" for s in range(60))
_MILLIS: Final = tuple(f".{ms:03d}Z" for ms in range(1000))
_DAY: Final = 86400
_AUTHOR: Final = _cc(_HL7 + "provenance-participant-type", "author", "Author", text=False)
_ACTIVITIES: Final = tuple(
    _cc(_HL7 + "v3-DataOperation", code, display, text=False)
    for code, display in (("CREATE", "create"), ("UPDATE", "revise"))
)


def _uuid4(bits: int) -> str:
    """A UUID-4 string, as ``str(uuid.UUID(int=bits, version=4))``."""
    h = "%032x" % ((bits & _V4_CLEAR) | _V4_SET)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class _Generator:
    """One run: the rng, the day table of the window and the pool of care providers."""

    def __init__(self, seed: int, now: datetime) -> None:
        self.rng = random.Random(seed)
        self.random = self.rng.random
        self.bits = self.rng.getrandbits
        now = now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)
        first_day = (now - WINDOW).replace(hour=0, minute=0, second=0, microsecond=0)
        base = int(first_day.timestamp())  # times are int seconds after base
        self.start = int((now - WINDOW).timestamp()) + 1 - base
        self.last = int(now.timestamp()) - 1 - base
        self.days = [str(first_day.date() + timedelta(d)) for d in range(self.last // _DAY + 1)]
        self.born_before = now.year - 6  # birthDates fall before the window
        self.provenance_rng = random.Random(f"provenance-{seed}")
        self.window_end = now - timedelta(seconds=1)

    def new_id(self) -> str:
        return _uuid4(self.bits(128))

    def clock(self, time: int) -> str:
        """``YYYY-MM-DDThh:mm:ss`` (UTC): add ``Z`` for a dateTime, ``.sssZ`` for an instant."""
        day, second = divmod(time, _DAY)
        return self.days[day] + _CLOCK[second // 60] + _SECONDS[second % 60]

    def meta(self, updated: str) -> dict[str, str]:
        """``meta`` with a lastUpdated instant in the second ``updated`` (a :meth:`clock`)."""
        return {"lastUpdated": updated + _MILLIS[int(self.random() * 1000)]}

    def pick(self, seq: Sequence[Any]) -> Any:
        return seq[int(self.random() * len(seq))]

    def when(self, room: int) -> int:
        """A time in the window, at least ``room`` seconds before its end."""
        return self.start + int(self.random() * (self.last - room - self.start))

    def early(self) -> dict[str, str]:
        """``meta`` for the shared pool: updated in the window's first month."""
        return self.meta(self.clock(self.start + int(self.random() * 30 * _DAY)))

    def run(self, patients: int) -> Iterator[Resource]:
        care: list[_Care] = []
        for _ in range(5):
            org = self.organization()
            yield org
            provider = {"reference": f"Organization/{org['id']}", "display": org["name"]}
            for _ in range(4):
                doctor = self.practitioner()
                yield doctor
                name = doctor["name"][0]
                display = f"Dr. {name['given'][0]} {name['family']}"
                care.append(
                    (provider, {"reference": f"Practitioner/{doctor['id']}", "display": display})
                )
        members: list[str] = []
        for _ in range(patients):
            pid = self.new_id()
            members.append(f"Patient/{pid}")
            yield from self.patient(pid, care)
        for name, share in (("Cohort A", 0.6), ("Cohort B", 0.35)):
            yield self.group(name, [member for member in members if self.random() < share])
        yield self.group("Pilot", self.rng.sample(members, min(5, len(members))))

    def address(self) -> list[dict[str, Any]]:
        city, postal = self.pick(_CITIES)
        line = f"{1 + int(self.random() * 999)} {self.pick(_STREETS)}"
        return [
            {"line": [line], "city": city, "state": "MA", "postalCode": postal, "country": "US"}
        ]

    def phone(self) -> str:
        return f"555-{100 + self.bits(16) % 900}-{1000 + self.bits(16) % 9000}"

    def organization(self) -> Resource:
        oid = self.new_id()
        return {
            "resourceType": "Organization",
            "id": oid,
            "meta": self.early(),
            "identifier": [{"system": _SYNTHEA, "value": oid}],
            "active": True,
            "type": _PROVIDER,
            "name": f"{self.pick(_FAMILY)} Medical Center",
            "address": self.address(),
            "telecom": [{"system": "phone", "value": self.phone()}],
        }

    def practitioner(self) -> Resource:
        gender = self.pick(_GENDERS)
        npi = {
            "system": "http://hl7.org/fhir/sid/us-npi",
            "value": str(9_990_000_000 + self.bits(23)),
        }
        name = {
            "family": self.pick(_FAMILY),
            "given": [self.pick(_GIVEN[gender])],
            "prefix": ["Dr."],
        }
        return {
            "resourceType": "Practitioner",
            "id": self.new_id(),
            "meta": self.early(),
            "identifier": [npi],
            "active": True,
            "name": [name],
            "gender": gender,
            "address": self.address(),
            "telecom": [{"system": "phone", "value": self.phone()}],
        }

    def group(self, name: str, members: list[str]) -> Resource:
        return {
            "resourceType": "Group",
            "id": self.new_id(),
            "meta": self.meta(self.clock(self.last - int(self.random() * 30 * _DAY))),
            "identifier": [{"system": _SYNTHEA, "value": name.lower().replace(" ", "-")}],
            "type": "person",
            "actual": True,
            "name": name,
            "quantity": len(members),
            "member": [{"entity": {"reference": reference}} for reference in members],
        }

    def patient(self, pid: str, care: list[_Care]) -> Iterator[Resource]:
        r, pick = self.random, self.pick
        visits = sorted(self.when(room=6 * _DAY) for _ in range(3 + int(r() * 5)))
        gender = pick(_GENDERS)
        given, family = pick(_GIVEN[gender]), pick(_FAMILY)
        born = f"{self.born_before - int(r() * 84)}-{1 + int(r() * 12):02d}-{1 + int(r() * 28):02d}"
        yield {
            "resourceType": "Patient",
            "id": pid,
            "meta": self.meta(self.clock(max(self.start, visits[0] - int(r() * _DAY)))),
            "identifier": [
                {"system": _SYNTHEA, "value": pid},
                {"type": _MRN, "system": "http://hospital.smarthealthit.org", "value": pid},
            ],
            "name": [
                {
                    "use": "official",
                    "family": family,
                    "given": [given],
                    "prefix": ["Ms." if gender == "female" else "Mr."],
                }
            ],
            "telecom": [{"system": "phone", "value": self.phone(), "use": "home"}],
            "gender": gender,
            "birthDate": born,
            "address": self.address(),
        }
        subject = {"reference": f"Patient/{pid}", "display": f"{given} {family}"}
        encounters = []
        for begin in visits:
            recorded = self.encounter(begin, subject, pick(care))
            encounters.append(next(recorded))  # the Encounter comes first
            yield encounters[-1]
            yield from recorded
        yield from self.provenance(pid, encounters)

    def provenance(self, pid: str, encounters: list[Resource]) -> Iterator[Resource]:
        """The Patient's record was created (one Provenance naming the Patient and every
        Encounter) and, for about a third of the Patients, amended later (a second one
        naming the same targets): so the latest Provenance of a resource is not always
        its only one. Drawn from a second rng, so the rest of the data set is the same
        as without them."""
        rng = self.provenance_rng
        last = encounters[-1]
        created = max(e["meta"]["lastUpdated"] for e in encounters)
        targets = [{"reference": f"Patient/{pid}"}]
        targets += [{"reference": f"Encounter/{e['id']}"} for e in encounters]
        who, provider = last["participant"][0]["individual"], last["serviceProvider"]
        moments = [created]
        if rng.random() < 1 / 3:
            later = datetime.fromisoformat(created) + timedelta(seconds=rng.randrange(1, 30 * _DAY))
            moments.append(min(later, self.window_end).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z")
        for moment, activity in zip(moments, _ACTIVITIES, strict=False):
            yield {
                "resourceType": "Provenance",
                "id": _uuid4(rng.getrandbits(128)),
                "meta": {"lastUpdated": moment},
                "target": [dict(t) for t in targets],
                "recorded": moment,
                "activity": activity,
                "agent": [{"type": _AUTHOR, "who": dict(who), "onBehalfOf": dict(provider)}],
            }

    def encounter(self, begin: int, subject: dict[str, str], care: _Care) -> Iterator[Resource]:
        """An Encounter, then what was recorded in it, all updated in the same second."""
        r, new_id, meta, pick = self.random, self.new_id, self.meta, self.pick
        klass, kind, shortest, longest = pick(_ENCOUNTERS)
        end = min(begin + shortest + int(r() * (longest - shortest)), self.last)
        updated = self.clock(min(end + int(r() * 3600), self.last))
        started, ended = self.clock(begin), self.clock(end)
        start_at, end_at = started + "Z", ended + "Z"
        period = {"start": start_at, "end": end_at}
        provider, doctor = care
        eid = new_id()
        yield {
            "resourceType": "Encounter",
            "id": eid,
            "meta": meta(updated),
            "status": "finished",
            "class": klass,
            "type": kind,
            "subject": dict(subject),
            "participant": [{"type": _PPRF, "period": dict(period), "individual": dict(doctor)}],
            "period": period,
            "serviceProvider": dict(provider),
        }
        encounter = {"reference": f"Encounter/{eid}"}
        if r() < 0.3:
            resolved = r() < 0.5
            condition = {
                "resourceType": "Condition",
                "id": new_id(),
                "meta": meta(updated),
                "clinicalStatus": _CLINICAL["resolved" if resolved else "active"],
                "verificationStatus": _CONFIRMED,
                "category": _DIAGNOSIS,
                "code": pick(_CONDITIONS),
                "subject": dict(subject),
                "encounter": dict(encounter),
                "onsetDateTime": start_at,
                "recordedDate": start_at,
            }
            if resolved:
                condition["abatementDateTime"] = end_at
            yield condition
        vitals = _VITALS[: 3 + int(r() * 6)]
        yield from self.observations(vitals, _VITAL_SIGNS, subject, encounter, started, updated)
        if r() < 0.5:
            report, tests = pick(_PANELS)
            results = []
            for obs in self.observations(tests, _LABORATORY, subject, encounter, started, updated):
                results.append(
                    {"reference": f"Observation/{obs['id']}", "display": obs["code"]["text"]}
                )
                yield obs
            yield {
                "resourceType": "DiagnosticReport",
                "id": new_id(),
                "meta": meta(updated),
                "status": "final",
                "category": _LAB,
                "code": report,
                "subject": dict(subject),
                "encounter": dict(encounter),
                "effectiveDateTime": start_at,
                "issued": ended + ".000Z",
                "result": results,
            }
        if r() < 0.3:
            yield {
                "resourceType": "Procedure",
                "id": new_id(),
                "meta": meta(updated),
                "status": "completed",
                "code": pick(_PROCEDURES),
                "subject": dict(subject),
                "encounter": dict(encounter),
                "performedPeriod": dict(period),
            }
        if r() < 0.4:
            yield {
                "resourceType": "MedicationRequest",
                "id": new_id(),
                "meta": meta(updated),
                "status": "active" if r() < 0.4 else "stopped",
                "intent": "order",
                "medicationCodeableConcept": pick(_MEDICATIONS),
                "subject": dict(subject),
                "encounter": dict(encounter),
                "authoredOn": start_at,
                "requester": dict(doctor),
                "dosageInstruction": [{"sequence": 1, "asNeededBoolean": r() < 0.3}],
            }
        if r() < 0.3:
            yield {
                "resourceType": "Immunization",
                "id": new_id(),
                "meta": meta(updated),
                "status": "completed",
                "vaccineCode": pick(_VACCINES),
                "patient": dict(subject),
                "encounter": dict(encounter),
                "occurrenceDateTime": start_at,
                "primarySource": True,
            }

    def observations(
        self,
        tests: Sequence[_Test],
        category: list[Concept],
        subject: dict[str, str],
        encounter: dict[str, str],
        taken: str,
        updated: str,
    ) -> Iterator[Resource]:
        r, new_id, meta = self.random, self.new_id, self.meta
        effective, issued = taken + "Z", taken + ".000Z"
        for code, unit, low, high in tests:
            value = {
                "value": round(low + r() * (high - low), 1),
                "unit": unit,
                "system": "http://unitsofmeasure.org",
                "code": unit,
            }
            yield {
                "resourceType": "Observation",
                "id": new_id(),
                "meta": meta(updated),
                "status": "final",
                "category": category,
                "code": code,
                "subject": dict(subject),
                "encounter": dict(encounter),
                "effectiveDateTime": effective,
                "issued": issued,
                "valueQuantity": value,
            }


def generate(patients: int, seed: int = 0, now: datetime | None = None) -> Iterator[Resource]:
    """Yield a Synthea-shaped data set for ``patients`` Patients; the same for the same args.

    ``now`` (default :data:`DEFAULT_NOW`; naive means UTC) ends the :data:`WINDOW` in which
    every ``meta.lastUpdated`` and clinical date falls.
    """
    if patients < 0:
        raise ValueError("patients must be >= 0")
    return _Generator(seed, DEFAULT_NOW if now is None else now).run(patients)


Prepared = tuple[str, str, int, int, bytes, frozenset[str]]
"""A NewVersion as a plain tuple: tuples of str and bytes pickle fast."""
BATCH = 25_000


def produce(patients: int, seed: int, out: BinaryIO) -> None:
    """Write the data set's first versions, prepared, to ``out``: pickled batches, then a
    pickled None. ``exportsvc.seeding`` runs this as ``python -m exportsvc.seed`` so that
    preparing runs on a second core and the process imports only this module."""
    gc.disable()  # the data makes no reference cycles
    now = datetime.now(UTC)
    batch: list[Prepared] = []
    for resource in generate(patients, seed=seed):
        v = new_version(resource, None, now, keep_last_updated=True)
        assert v is not None
        batch.append(tuple(v))  # type: ignore[arg-type]
        if len(batch) == BATCH:
            pickle.dump(batch, out, protocol=pickle.HIGHEST_PROTOCOL)
            batch = []
    if batch:
        pickle.dump(batch, out, protocol=pickle.HIGHEST_PROTOCOL)
    pickle.dump(None, out)
    out.flush()


if __name__ == "__main__":
    produce(int(sys.argv[1]), int(sys.argv[2]), sys.stdout.buffer)
