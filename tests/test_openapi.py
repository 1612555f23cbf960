"""The OpenAPI document and the offline docs page (router/openapi.py), over a real socket."""

from __future__ import annotations

import asyncio
import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from litestar import Litestar
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from policies.schema import load_policy
from router.app import create_app
from router.openapi import document
from router.settings import Settings
from tests.conftest import ROOT, serve_router
from tests.test_dashboard_browser import APT_TIMEOUT_S, browser, chromium  # noqa: F401  (a fixture)
from tests.test_policies import DEMO

METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}


def app_routes(app: Litestar) -> set[tuple[str, str]]:
    return {(m.lower(), r.path_format) for r in app.routes for m in getattr(r, "methods", ()) if m in METHODS}


def test_document_is_valid_openapi_31_and_schemathesis_loads_it() -> None:
    doc = document()
    assert doc["openapi"] == "3.1.0"
    schema = schemathesis.openapi.from_dict(doc)
    schema.validate()                         # OpenAPI 3.1 meta-schema
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {(op.method.lower(), op.path) for op in ops} >= {("post", "/v1/chat/completions"),
                                                             ("post", "/v1/completions"), ("get", "/v1/models")}


def test_every_route_of_the_app_is_described(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=str(tmp_path), redis_url=""), policy=load_policy(DEMO))
    described = {(m, p) for p, item in document()["paths"].items() for m in item}
    routes = app_routes(app)
    assert len(routes) >= 16
    assert routes - described == set()
    assert described - routes == set()        # and nothing that is not served


def test_request_bodies_and_errors_have_openais_shapes() -> None:
    doc = document()
    schemas = doc["components"]["schemas"]
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"}
    req = schemas["ChatCompletionRequest"]
    assert {"model", "messages"} <= set(req["required"])
    props = req["properties"]
    roles = props["messages"]["items"]["discriminator"]["mapping"]
    assert set(roles) == {"system", "user", "assistant", "tool", "developer"}
    temp = next(s for s in props["temperature"]["anyOf"] if s.get("type") == "number")
    assert (temp["minimum"], temp["maximum"]) == (0, 2)
    top_p = next(s for s in props["top_p"]["anyOf"] if s.get("type") == "number")
    assert (top_p["exclusiveMinimum"], top_p["maximum"]) == (0, 1)
    for field in ("max_tokens", "max_completion_tokens", "stream", "stream_options", "n", "stop"):
        assert field in props, field
    assert "prompt" in schemas["CompletionRequest"]["required"]
    user_content = schemas["UserMessage"]["properties"]["content"]["anyOf"]
    assert {c.get("type") for c in user_content} == {"string", "array"}
    ok = chat["responses"]["200"]
    assert set(ok["content"]) == {"application/json", "text/event-stream"}
    assert ok["content"]["text/event-stream"]["schema"]["x-event-schema"]["$ref"].endswith("/ChatCompletionChunk")
    assert {"x-request-id", "x-tiergate-tier"} <= set(ok["headers"])
    for code in ("400", "401", "403", "404", "413", "429", "503"):
        assert chat["responses"][code]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "Retry-After" in chat["responses"]["429"]["headers"] and "Retry-After" in chat["responses"]["503"]["headers"]
    assert set(schemas["ErrorDetail"]["required"]) == {"message", "type", "param", "code"}
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "An API key from the policy file."}


def test_package_data_ships_the_docs_page() -> None:
    """What /schema reads from the package is declared as package data, so an installed wheel has it."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["router"]
    files = [p.relative_to(ROOT / "router").as_posix() for p in (ROOT / "router" / "openapi_static").iterdir()]
    assert files and all(any(fnmatch(f, g) for g in cfg) for f in files)


def local_refs(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


async def test_served_document_and_docs_page_use_only_local_assets() -> None:
    async with serve_router(load_policy(DEMO)) as base, httpx.AsyncClient(base_url=base) as c:
        r = await c.get("/schema/openapi.json")
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
        assert r.json() == document()
        page = await c.get("/schema")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        refs = local_refs(page.text)
        assert len(refs) >= 3
        for ref in refs:
            assert ref.startswith("/") and not ref.startswith("//"), ref     # no CDN, no other host
            got = await c.get(ref)
            assert got.status_code == 200 and len(got.content) > 100, ref
        missing = await c.get("/schema/assets/nope.js")
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "name"


@pytest.mark.timeout(APT_TIMEOUT_S + 300)  # the first browser test may install chromium
async def test_docs_page_renders_every_operation_in_chromium(chromium: tuple[str, str]) -> None:  # noqa: F811
    n_ops = sum(len(item) for item in document()["paths"].values())
    async with serve_router(load_policy(DEMO)) as base:

        def run() -> tuple[int, list[dict[str, Any]], list[str], list[str]]:
            drv = browser(chromium)
            try:
                drv.get(base + "/schema")
                WebDriverWait(drv, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= n_ops)
                blocks = len(drv.find_elements(By.CSS_SELECTOR, ".opblock"))
                urls = drv.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
                text = drv.find_element(By.TAG_NAME, "body").text
                warnings = [line for line in text.splitlines()      # Swagger UI's "Warning" and "Errors" boxes
                            if re.fullmatch(r"\s*(warning|errors?)\s*", line, re.I) or "not supported" in line]
                return blocks, drv.get_log("browser"), list(urls), warnings
            finally:
                drv.quit()

        blocks, logs, urls, warnings = await asyncio.to_thread(run)
    assert blocks == n_ops
    assert warnings == []                     # Swagger UI took the document without a complaint
    assert [e for e in logs if e.get("level") == "SEVERE"] == []
    assert urls and all(u.startswith(base + "/") for u in urls), urls   # every fetch went to the router
