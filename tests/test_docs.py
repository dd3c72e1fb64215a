"""/docs, /redoc and the OpenAPI document: usable on a machine without internet."""

from __future__ import annotations

import re

import httpx

from tests.conftest import ROW, Stack


def test_docs_pages_load_their_files_from_the_api_itself(stack: Stack) -> None:
    for page in ("/docs", "/redoc"):
        html = httpx.get(stack.api_url + page, timeout=10)
        assert html.status_code == 200
        sources = re.findall(r'(?:src|href)="([^"]+)"', html.text)
        assert sources, html.text
        for src in sources:
            assert src.startswith("/"), f"{page} loads {src} from elsewhere"
            if src.endswith((".js", ".css")):
                asset = httpx.get(stack.api_url + src, timeout=10)
                assert asset.status_code == 200 and len(asset.content) > 10_000, src


def test_openapi_declares_the_bearer_key_and_typed_inputs(stack: Stack) -> None:
    spec = httpx.get(stack.api_url + "/openapi.json", timeout=10).json()
    scheme = spec["components"]["securitySchemes"]["apiKey"]
    assert scheme == {**scheme, "type": "http", "scheme": "bearer"}
    assert spec["paths"]["/v1/jobs"]["post"]["security"] == [{"apiKey": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    body = spec["components"]["schemas"]["JobCreate"]["properties"]["inputs"]
    array = next(t for t in body["anyOf"] if t.get("type") == "array")
    assert array["items"]["type"] == "object"
    assert "/v1/models/{name}/row-schema" in body["description"]
    assert "/v1/models/{name}/row-schema" in spec["paths"]


def test_a_models_row_schema_is_a_json_schema_the_demo_row_meets(
    stack: Stack, client: httpx.Client
) -> None:
    import jsonschema

    r = client.get("/v1/models/churn/row-schema")
    assert r.status_code == 200, r.text
    schema = r.json()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(ROW, schema)
    assert schema["properties"]["plan_tier"]["enum"]
    bad = {**ROW, "plan_tier": "platinum"}
    assert not jsonschema.Draft202012Validator(schema).is_valid(bad)
    assert client.get("/v1/models/churn/row-schema", params={"version": 999}).status_code == 404
    assert client.get("/v1/models/nope/row-schema").status_code == 404
