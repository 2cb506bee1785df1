"""The live control API against its OpenAPI document (proxy/api/openapi.json) with schemathesis: every operation,
a bounded number of generated requests each, every answer checked for status, content type and schema, no 5xx."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from devtools.servers import PostgresInstance
from support import ProxyProcess, running_proxy

TOKEN = "schema-token-1b2c3d"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 12  # generated requests per operation
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresInstance) -> Iterator[ProxyProcess]:
    with running_proxy(tmp_path_factory.mktemp("api-schema"), pg_server,
                       api={"port": 0, "token": TOKEN, "health_port": -1}) as started:
        yield started


def test_the_document_is_the_one_in_the_package(proxy: ProxyProcess) -> None:
    url = f"http://127.0.0.1:{proxy.ports['api']}/v1/openapi.json"
    served = urllib.request.urlopen(urllib.request.Request(url, headers=AUTH), timeout=10).read()
    packaged = (Path(__file__).parent.parent / "proxy" / "api" / "openapi.json").read_bytes()
    assert json.loads(served) == json.loads(packaged)


def _fuzz(operation: schemathesis.APIOperation, base: str) -> int:
    """Send EXAMPLES generated requests to the operation and check each answer; returns how many were sent."""
    calls = 0

    @given(data=st.data())
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(data: st.DataObject) -> None:
        nonlocal calls
        case = data.draw(operation.as_strategy())
        case.call_and_validate(base_url=base, headers=AUTH, checks=CHECKS, timeout=10)
        calls += 1

    run()
    return calls


def test_live_api_conforms_to_its_openapi_document(proxy: ProxyProcess) -> None:
    base = f"http://127.0.0.1:{proxy.ports['api']}"
    schema = schemathesis.openapi.from_url(f"{base}/v1/openapi.json", headers=AUTH, timeout=10)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 22
    started = time.monotonic()
    calls = [_fuzz(operation, base) for operation in operations]
    assert all(calls), dict(zip((operation.label for operation in operations), calls, strict=True))
    assert time.monotonic() - started < 30
    # whatever the requests did, the proxy still serves (pause may have been called last)
    resume = urllib.request.Request(f"{base}/v1/resume", data=b"{}", method="POST", headers=AUTH)
    assert urllib.request.urlopen(resume, timeout=10).status == 200
