"""_typeFilter and _elements as pure functions: FHIRPath, values, parsing, matching."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from exportsvc import filtercheck
from exportsvc.fhir.build_search_parameters import build
from exportsvc.fhir.fhirpath import UnsupportedExpression, compile_expression
from exportsvc.fhir.search_params import parameters_of, search_param
from exportsvc.search.elements import SUBSETTED, elements_for, subset
from exportsvc.search.matcher import FilterError, compile_filters
from exportsvc.search.parse import (
    ElementsError,
    parse_elements,
    parse_type_filter,
    split_type_filters,
)
from exportsvc.search.values import date_range

OBS: dict[str, Any] = {
    "resourceType": "Observation",
    "id": "o1",
    "meta": {"lastUpdated": "2024-03-10T08:30:00.250Z", "tag": [{"system": "s", "code": "t"}]},
    "status": "final",
    "statusReason": {"text": "not a choice of status"},
    "category": [{"coding": [{"system": "http://cat", "code": "laboratory"}]}],
    "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}], "text": "Glucose"},
    "identifier": [{"system": "http://ids", "value": "A-1"}],
    "subject": {"reference": "Patient/p1"},
    "encounter": {"reference": "http://other.example/fhir/Encounter/e1/_history/2"},
    "effectivePeriod": {"start": "2024-03-01T10:00:00Z", "end": "2024-03-02T10:00:00Z"},
    "valueQuantity": {"value": 5},
}


def values(expression: str, resource: dict[str, Any] = OBS) -> list[Any]:
    return [n.value for n in compile_expression(expression).evaluate(resource)]


def test_fhirpath_paths_choices_casts_and_references() -> None:
    assert values("Observation.code.coding.code") == ["2339-0"]
    assert values("Observation.effective") == [OBS["effectivePeriod"]]
    assert values("(Observation.effective as dateTime)") == []
    assert values("Observation.effective.as(Period)") == [OBS["effectivePeriod"]]
    assert values("Observation.effective.ofType(Period).start") == ["2024-03-01T10:00:00Z"]
    assert values("Observation.status") == ["final"]
    assert values("Observation.subject.where(resolve() is Patient)") == [OBS["subject"]]
    assert values("Observation.subject.where(resolve() is Group)") == []
    assert values("Observation.code | Observation.category.coding.code") == [
        OBS["code"],
        "laboratory",
    ]
    assert values("Patient.name") == []  # another type's path selects nothing
    assert values("Resource.meta.lastUpdated") == ["2024-03-10T08:30:00.250Z"]
    no_status = {k: v for k, v in OBS.items() if k != "status"}
    assert values("Observation.status", no_status) == []  # statusReason is not status[x]


@pytest.mark.parametrize(
    "expression",
    ["Observation.code.exists()", "Patient.telecom.where(system='phone')", "Observation", "1+1"],
)
def test_fhirpath_refuses_what_it_does_not_implement(expression: str) -> None:
    with pytest.raises(UnsupportedExpression):
        compile_expression(expression)


def micros(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp()) * 1_000_000  # type: ignore[misc]


def test_dates_stand_for_the_range_of_their_precision() -> None:
    assert date_range("2024") == (micros(2024, 1, 1), micros(2025, 1, 1))
    assert date_range("2024-12") == (micros(2024, 12, 1), micros(2025, 1, 1))
    assert date_range("2024-02-29") == (micros(2024, 2, 29), micros(2024, 3, 1))
    assert date_range("2024-02-29T10:00Z") == (micros(2024, 2, 29, 10), micros(2024, 2, 29, 10, 1))
    low = micros(2024, 2, 29, 8, 0, 5)
    assert date_range("2024-02-29T10:00:05+02:00") == (low, low + 1_000_000)
    assert date_range("2024-02-29T08:00:05.25Z") == (low + 250_000, low + 260_000)
    assert date_range("2024-02-30") is None and date_range("soon") is None


def matches(query: str, resource: dict[str, Any] = OBS) -> bool:
    parsed = parse_type_filter(query)
    return compile_filters([parsed])[parsed.type].matches(resource)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        # token: code, system|code, |code, system|, :not, comma = OR
        ("Observation?code=2339-0", True),
        ("Observation?code=http://loinc.org|2339-0", True),
        ("Observation?code=http://snomed.info/sct|2339-0", False),
        ("Observation?code=|2339-0", False),
        ("Observation?status=|final", True),
        ("Observation?code=http://loinc.org|", True),
        ("Observation?category=vital-signs,laboratory", True),
        ("Observation?identifier=http://ids|A-1", True),
        ("Observation?status:not=final", False),
        ("Observation?status:not=amended", True),
        ("Observation?_tag=s|t", True),
        ("Observation?_id=o1,o2", True),
        # reference: Type/id, bare id, absolute and versioned, :Type
        ("Observation?subject=Patient/p1", True),
        ("Observation?subject=p1", True),
        ("Observation?patient=p1", True),
        ("Observation?subject:Group=p1", False),
        ("Observation?encounter=Encounter/e1", True),
        ("Observation?encounter=e2", False),
        # date on a Period 2024-03-01T10:00:00Z .. 2024-03-02T10:00:00Z (to its last second)
        ("Observation?date=2024-03", True),
        ("Observation?date=2024-03-01", False),
        ("Observation?date=ne2024-03-01", True),
        ("Observation?date=gt2024-03-01", True),
        ("Observation?date=gt2024-03-02", False),
        # ge and le read literally (R4): gt or eq, lt or eq, so a Period that overlaps the
        # search day but also starts before it is not "ge" that day
        ("Observation?date=ge2024-03-01", True),
        ("Observation?date=ge2024-03-02", False),
        ("Observation?date=lt2024-03-02", True),
        ("Observation?date=lt2024-03-01", False),
        ("Observation?date=le2024-03-02", True),
        ("Observation?date=le2024-03-01", False),
        ("Observation?date=le2024-03", True),
        ("Observation?date=sa2024-02-29", True),
        ("Observation?date=sa2024-03-01", False),
        ("Observation?date=eb2024-03-03", True),
        ("Observation?date=eb2024-03-02", False),
        ("Observation?date=ge2024-01&date=lt2025", True),
        ("Observation?_lastUpdated=2024-03-10", True),
        ("Observation?_lastUpdated=gt2024-03-10T08:29:59Z", True),
        ("Observation?_lastUpdated=gt2024-03-10T08:30:00Z", False),  # .250 is in that second
        ("Observation?_lastUpdated=ge2024-03-10T08:30:00Z", True),
        ("Observation?_lastUpdated=eq2024-03-10T08:30:00.25Z", True),
        # :missing, several criteria AND'd
        ("Observation?subject:missing=false&status=final", True),
        ("Observation?focus:missing=true", True),
        ("Observation?focus:missing=false", False),
    ],
)
def test_observation_queries(query: str, expected: bool) -> None:
    assert matches(query) is expected
    # the DataValidator's own reading agrees
    assert filtercheck.selected(OBS, [parse_type_filter(query)]) is expected


def both(query: str, resource: dict[str, Any]) -> bool:
    parsed = parse_type_filter(query)
    theirs = filtercheck.selected(resource, [parsed])
    assert matches(query, resource) is theirs, query
    return theirs


def test_strings_are_case_and_accent_insensitive_prefixes() -> None:
    patient = {
        "resourceType": "Patient",
        "id": "p",
        "name": [{"use": "official", "family": "Müller-Lüdenscheidt", "given": ["Zoë"]}],
        "address": [{"city": "São Paulo", "line": ["1 Rua"]}],
    }
    assert both("Patient?family=muller", patient)
    assert both("Patient?name=ZOE", patient)
    assert not both("Patient?name=oe", patient)
    assert both("Patient?name:contains=LUDEN", patient)
    assert not both("Patient?family:exact=muller-ludenscheidt", patient)
    assert both("Patient?family:exact=Müller-Lüdenscheidt", patient)
    assert both("Patient?address-city=sao", patient)
    assert not both("Patient?name=official", patient)  # a name's use is not its text
    assert both("Patient?name=xyz,zo", patient)


def test_several_queries_for_a_type_are_ored() -> None:
    queries = [
        parse_type_filter("Observation?status=amended"),
        parse_type_filter("Observation?code=2339-0"),
    ]
    assert compile_filters(queries)["Observation"].matches(OBS)
    assert not compile_filters(queries[:1])["Observation"].matches(OBS)


def test_type_filter_values_split_as_clients_send_them() -> None:
    # smart-fetch: the query's own commas encoded as %2C, queries joined by ","
    sent = "Observation?category=social-history%2Cvital-signs,Patient?gender=female"
    first, second = [parse_type_filter(q) for q in split_type_filters([sent])]
    assert first.criteria[0].values == ["social-history", "vital-signs"]
    assert (second.type, second.criteria[0].values) == ("Patient", ["female"])
    # plain commas inside a query stay in it; an escaped comma is part of a value
    (one,) = [parse_type_filter(q) for q in split_type_filters(["Observation?code=a,b\\,c"])]
    assert one.criteria[0].values == ["a", "b,c"]
    # a '+' in a time zone stays a plus
    (tz,) = split_type_filters(["Observation?date=ge2024-01-01T00:00:00+01:00"])
    assert parse_type_filter(tz).criteria[0].values == ["ge2024-01-01T00:00:00+01:00"]


@pytest.mark.parametrize(
    ("query", "named", "unsupported"),
    [
        ("Observation", "ResourceType?", False),
        ("Nope?code=1", "'Nope'", False),
        ("Observation?", "no search parameters", False),
        ("Observation?code", "'code'", False),
        ("Observation?_sort=date", "_sort", False),
        ("Observation?_include=Observation:subject", "_include", False),
        ("Observation?subject.name=x", "chained", True),
        ("Observation?_has:Condition:subject:code=1", "chained", True),
        ("Observation?value-quantity=5", "'value-quantity'", True),
        ("Observation?code:above=1", ":above", True),
        ("Observation?date=ap2024", "ap", True),
        ("Observation?date=yesterday", "date=yesterday", False),
        ("Observation?code=", "no value", False),
        ("Observation?focus:missing=maybe", "true or false", False),
        ("Observation?patient=Practitioner/1", "Practitioner", False),
    ],
)
def test_type_filter_errors_name_the_problem(query: str, named: str, unsupported: bool) -> None:
    with pytest.raises(FilterError, match=named) as caught:
        parse_type_filter(query)
    assert caught.value.unsupported is unsupported


def test_store_bounds_cover_every_query_of_a_type() -> None:
    def bounds(*queries: str) -> Any:
        parsed = [parse_type_filter(q) for q in queries]
        return compile_filters(parsed)[parsed[0].type].bounds

    one = bounds("Patient?_lastUpdated=ge2024&_lastUpdated=lt2024-07&gender=female")
    assert one.since == datetime(2023, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert one.until == datetime(2024, 7, 1, 0, 0, 1, tzinfo=UTC)
    hull = bounds("Patient?_lastUpdated=2021", "Patient?_lastUpdated=2023")
    assert hull.since.year == 2020 and hull.until.year == 2024
    assert bounds("Patient?_lastUpdated=2021", "Patient?gender=male").since is None
    assert bounds("Patient?_id=a,b", "Patient?_id=c&_id=c,d").ids == ("a", "b", "c")
    assert bounds("Patient?_id=a", "Patient?gender=male").ids is None


def test_elements_parse_and_subset() -> None:
    assert parse_elements(["id,Patient.name", "value[x], name"]) == [
        "id",
        "Patient.name",
        "value",
        "name",
    ]
    for bad in ("Patient.name.family", "Nope.name", "Name", "a-b"):
        with pytest.raises(ElementsError):
            parse_elements([bad])
    elements = ["Observation.value", "status"]
    assert elements_for(elements, "Observation") == {"value", "status"}
    assert elements_for(["Observation.value"], "Patient") is None
    out = subset(OBS, frozenset({"value", "status"}))
    assert set(out) == {"resourceType", "id", "meta", "status", "valueQuantity"}
    assert out["meta"]["tag"] == [{"system": "s", "code": "t"}, SUBSETTED]
    assert OBS["meta"]["tag"] == [{"system": "s", "code": "t"}]  # the input is unchanged
    assert subset(out, frozenset({"status"}))["meta"]["tag"].count(SUBSETTED) == 1


def test_definitions_come_from_the_r4_bundle() -> None:
    assert search_param("Observation", "date").expression.text == "Observation.effective"
    assert search_param("Condition", "onset-date").kind == "date"
    assert search_param("Immunization", "_lastUpdated").base == "Resource"
    assert "value-quantity" not in parameters_of("Observation")  # quantity: not implemented
    bundle = {
        "entry": [
            {
                "resource": {
                    "id": "clinical-code",
                    "code": "code",
                    "type": "token",
                    "base": ["Observation", "Basic"],
                    "expression": "Basic.code | Observation.code",
                }
            },
            {
                "resource": {
                    "id": "x-phone",
                    "code": "phone",
                    "type": "token",
                    "base": ["Patient"],
                    "expression": "Patient.telecom.where(system='phone')",
                }
            },
            {
                "resource": {
                    "id": "x-q",
                    "code": "value-quantity",
                    "type": "quantity",
                    "base": ["Observation"],
                    "expression": "Observation.value",
                }
            },
        ]
    }
    data, skipped = build(bundle)
    assert data["parameters"] == {
        "Observation": {
            "code": {"type": "token", "expression": "Observation.code", "id": "clinical-code"}
        }
    }
    assert len(skipped) == 2
