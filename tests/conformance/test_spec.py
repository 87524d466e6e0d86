"""docs/master-protocol.yaml is the rendering of exporter/conformance/schemas.py, a valid
OpenAPI 3.1 document, and says what docs/protocol.md says."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml
from openapi_spec_validator import validate

from exporter.conformance import openapi
from exporter.conformance.checks import READ_ONLY
from exporter.conformance.destructive import REQUIREMENTS
from exporter.conformance.schemas import SCHEMAS, validator_root

DOCS = Path(__file__).resolve().parents[2] / "docs"
YAML_FILE = DOCS / "master-protocol.yaml"


def test_the_yaml_file_is_the_rendering_of_the_python_schemas():
    assert YAML_FILE.read_text(encoding="utf-8") == openapi.render(), (
        "docs/master-protocol.yaml is stale: regenerate it with "
        "`python -m exporter.conformance.openapi > docs/master-protocol.yaml`")
    assert yaml.safe_load(YAML_FILE.read_text(encoding="utf-8")) == openapi.document()


def test_the_yaml_file_is_valid_openapi_3_1():
    doc = yaml.safe_load(YAML_FILE.read_text(encoding="utf-8"))
    assert doc["openapi"] == "3.1.0"
    validate(doc)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_schema_is_valid_json_schema_2020_12(name):
    jsonschema.Draft202012Validator.check_schema(validator_root(name))


def test_every_protocol_call_is_specified_with_the_epoch_on_control_calls():
    paths = openapi.document()["paths"]
    calls = {(m.upper(), p) for p, ops in paths.items() for m in ops}
    assert calls == {("GET", "/health"), ("GET", "/state"), ("POST", "/state"),
                     ("DELETE", "/state/{source}"), ("POST", "/activate"),
                     ("POST", "/deactivate")}
    epoch = {"$ref": "#/components/parameters/Epoch"}
    for method, path in calls - {("GET", "/health"), ("GET", "/state")}:
        op = paths[path][method.lower()]
        assert epoch in op["parameters"], (method, path)
        assert op["responses"]["409"] == {"$ref": "#/components/responses/StaleEpoch"}


def test_the_text_spec_names_every_requirement_the_checker_reports():
    text = (DOCS / "protocol.md").read_text(encoding="utf-8")
    for rid, _ in (*READ_ONLY, *REQUIREMENTS):
        assert f"`{rid}`" in text, rid
