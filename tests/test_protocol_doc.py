"""docs/PROTOCOL.md's field tables are written from the code's declarations
of every setting (fedavg.spec.Param) by scripts/protocol_tables.py: the doc
must be what it writes now. And, read back, the tables agree with the
OpenAPI documents built from the same declarations: the POST /start table
with the server's StartRequest (its dp.* and secagg.* tables with
DPSettings and SecAggSettings), the /train config table with the client's
TrainConfig. Same field names both ways; where both state a type, a default
or a bound, they agree."""
from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest

import protocol_tables
from conftest import ROOT
from fedavg.openapi import client_document
from fedavg_server.openapi import server_document

PROTOCOL = ROOT / "docs" / "PROTOCOL.md"


def section(text: str, heading: str) -> str:
    """From ``heading`` (a whole line) to the next heading of any level."""
    lines = text.splitlines()
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("#")), len(lines))
    return "\n".join(lines[start:end])


def tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table in ``text``, each a list of rows keyed by its header."""
    found, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            header, rows = block[0], block[2:]  # block[1] is the |---| line
            found.append([dict(zip(header, row)) for row in rows])
            block = []
    return found


def field_table(heading: str, prefix: str = "") -> dict[str, dict[str, str]]:
    """The table in ``heading``'s section whose fields all start with
    ``prefix``, as {field name without the prefix: its row}."""
    for table in tables(section(PROTOCOL.read_text(encoding="utf-8"), heading)):
        names = [re.fullmatch(r"`([a-z_.0-9]+)`", row["Field"]) for row in table]
        if table and all(names) and all(m.group(1).startswith(prefix) for m in names):
            return {m.group(1)[len(prefix):]: row for m, row in zip(names, table)}
    raise AssertionError(f"no field table with {prefix!r} fields under {heading!r} in {PROTOCOL}")


def stated_default(cell: str):
    """The JSON literal a Default cell starts with (`5`, `null`, `"fedavg"`), or
    a sentinel when it starts with words ("drawn at random")."""
    m = re.match(r"`([^`]+)`", cell)
    if m is None:
        return NOT_STATED
    try:
        return json.loads(m.group(1))
    except json.JSONDecodeError:
        return NOT_STATED


NOT_STATED = object()


INF, SYMBOL = "∞", "symbol"


def bound(text: str) -> float | str:
    """One end of an interval: a number (2^63-1 too), ∞, or a symbol such as
    K (the number of clients, which the schema need not state)."""
    text = text.strip().replace("−", "-")
    if text in ("∞", "-∞"):
        return INF
    if text == "2^63-1":
        return 2**63 - 1
    try:
        return float(text)
    except ValueError:
        return SYMBOL


def interval(cell: str) -> tuple[tuple[float | str, bool], tuple[float | str, bool]] | None:
    """`[1, 100000]` → ((1, inclusive), (100000, inclusive)); `(0, ∞)` → ((0,
    exclusive), (∞, …)); None when the cell states no interval."""
    m = re.search(r"`([\[(])([^,`]+),([^,`]+)([\])])`", cell)
    if m is None:
        return None
    return (bound(m.group(2)), m.group(1) == "("), (bound(m.group(3)), m.group(4) == ")")


def json_type(schema: dict) -> str:
    if "oneOf" in schema:  # "boolean or secaggsettings"
        return " or ".join(json_type(s) for s in schema["oneOf"])
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1].lower()  # "model"
    return schema["type"]


def check_against(doc: dict[str, dict[str, str]], properties: dict[str, dict], what: str) -> None:
    assert sorted(doc) == sorted(properties), (
        f"{what}: in the code, not in PROTOCOL.md: {sorted(set(properties) - set(doc))}; "
        f"in PROTOCOL.md, not in the code: {sorted(set(doc) - set(properties))}")
    for name, schema in properties.items():
        row = doc[name]
        # Type: the cell names the JSON type, and says null when null is allowed.
        typ, cell = json_type(schema), row["Type"].split(",")[0]
        assert (cell if " or " in typ else cell.split(" ")[0]) == typ, (what, name, row["Type"])
        assert ("`null`" in row["Type"]) == bool(schema.get("nullable")), (what, name, "nullable", row["Type"])
        # Default: every default the schema states is stated, and the same.
        default = stated_default(row["Default"])
        if "default" in schema:
            assert default is not NOT_STATED, (what, name, "the schema's default is not stated", schema["default"])
            assert default == schema["default"], (what, name, default, schema["default"])
        # Range: each numeric end the doc states is the schema's, and the other way round.
        stated = interval(row["Range"])
        if "minimum" in schema or "maximum" in schema:
            assert stated is not None, (what, name, "the schema's bounds are not stated", schema)
        if stated is None:
            continue
        for (value, is_open), key, flag in ((stated[0], "minimum", "exclusiveMinimum"),
                                            (stated[1], "maximum", "exclusiveMaximum")):
            if value == SYMBOL:
                continue  # K − 3, K: bounds that depend on the server's clients
            if key not in schema:
                assert value == INF, (what, name, f"the doc states {value}, the schema no {key}")
                continue
            assert value != INF, (what, name, f"the schema's {key} {schema[key]} is stated as ∞")
            assert math.isclose(value, schema[key]), (what, name, key, value, schema[key])
            assert is_open == bool(schema.get(flag, False)), (what, name, key, "open or closed?", row["Range"])


def test_the_tables_are_the_ones_the_code_writes():
    text = PROTOCOL.read_text(encoding="utf-8")
    assert protocol_tables.current(text) == text, "run .venv/bin/python scripts/protocol_tables.py"
    assert text.count("<!-- fields: ") == len(protocol_tables.TABLES)


def test_a_changed_setting_makes_the_doc_stale():
    """The generation itself: a bound changed in the code changes the table."""
    params, prefix = protocol_tables.TABLES["dp"]
    changed = dataclasses.replace(params[2], lt=0.5)  # dp.delta < 0.5 instead of < 1
    protocol_tables.TABLES["dp"] = ((*params[:2], changed, *params[3:]), prefix)
    try:
        text = PROTOCOL.read_text(encoding="utf-8")
        assert "`(0, 0.5)`" in protocol_tables.current(text) != text
    finally:
        protocol_tables.TABLES["dp"] = (params, prefix)


def test_the_start_table_is_the_servers_start_request():
    properties = server_document(2)["components"]["schemas"]["StartRequest"]["properties"]
    check_against(field_table("### POST /start"), properties, "StartRequest")


def test_the_secagg_table_is_the_servers_secagg_settings():
    properties = server_document(2)["components"]["schemas"]["SecAggSettings"]["properties"]
    check_against(field_table("### POST /start", "secagg."), properties, "SecAggSettings")


def test_the_dp_table_is_the_servers_dp_settings():
    properties = server_document(2)["components"]["schemas"]["DPSettings"]["properties"]
    check_against(field_table("### POST /start", "dp."), properties, "DPSettings")


def test_the_train_config_table_is_the_clients_train_config():
    properties = client_document(1)["components"]["schemas"]["TrainConfig"]["properties"]
    check_against(field_table("### POST /train", "config."), properties, "TrainConfig")


def test_the_check_notices_a_field_missing_from_the_doc():
    """The comparison itself: one field more in the code is a failure."""
    properties = server_document(2)["components"]["schemas"]["StartRequest"]["properties"]
    with pytest.raises(AssertionError, match="not in PROTOCOL.md"):
        check_against(field_table("### POST /start"), properties | {"new_field": {"type": "number"}}, "StartRequest")
    doc = field_table("### POST /start")
    with pytest.raises(AssertionError):
        check_against(doc | {"rounds": doc["rounds"] | {"Default": "`6`"}}, properties, "StartRequest")
    with pytest.raises(AssertionError):
        check_against(doc | {"rounds": doc["rounds"] | {"Range": "`[1, 99999]`"}}, properties, "StartRequest")
