"""The API against its own OpenAPI document, with schemathesis: requests generated from the
document, valid and invalid (wrong types, missing and extra fields, out-of-range numbers,
strings of every kind, broken bodies), sent to a real `migrating-proxy web` with an API token.

No request may get a 5xx, and every answer must match the document: status codes, content
types, headers and response schemas. Only `positive_data_acceptance` is left out: a request the
schema allows may still be refused with 400 and the CLI's words (a source URL with an unknown
scheme, an address that is not one), which a JSON schema cannot express.

schemathesis runs as its own command (`st run`), as its users run it: its pytest plugin does
not support pytest 9 yet.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.web import WebConsole

DOMAIN = "old.example"
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebConsole]:
    directory = tmp_path_factory.mktemp("schema")
    web = WebConsole(directory)
    web.add_admin()
    web.cli("domain", "add", DOMAIN, "--source", "imap://127.0.0.1:1")
    users = directory / "users.csv"
    users.write_text(f"ann@{DOMAIN},ann-pw\nben@{DOMAIN},ben-pw\n")
    web.cli("import", str(users))
    with web:
        yield web


def test_every_generated_request_gets_a_documented_answer(console: WebConsole,
                                                          tmp_path: Path) -> None:
    token = console.token()
    run = subprocess.run(
        [str(SCHEMATHESIS), "run", f"{console.url}/api/v1/openapi.json",
         "--header", f"Authorization: Bearer {token}",
         "--checks", "all", "--exclude-checks", "positive_data_acceptance",
         "--mode", "all", "--max-examples", "10", "--seed", "20261126",
         "--phases", "coverage,fuzzing,stateful", "--no-color"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    summary = run.stdout[run.stdout.rindex("API Operations:"):]
    paths = httpx.get(f"{console.url}/api/v1/openapi.json").json()["paths"]
    operations = sum(len(item) for item in paths.values())
    assert f"Tested: {operations}" in summary and operations >= 15, summary
    assert " passed" in summary and "failure" not in summary and "error" not in summary
    assert "Traceback" not in console.log_path.read_text()  # nothing unexpected server-side


def test_the_document_describes_every_admin_action(console: WebConsole) -> None:
    document = httpx.get(f"{console.url}/api/v1/openapi.json").json()
    operations = {(method, path) for path, item in document["paths"].items() for method in item}
    assert {("get", "/api/v1/domains"), ("get", "/api/v1/status"), ("post", "/api/v1/domains"),
            ("post", "/api/v1/import"), ("post", "/api/v1/migrate"), ("post", "/api/v1/resync"),
            ("post", "/api/v1/stop"), ("post", "/api/v1/start"), ("post", "/api/v1/finish"),
            ("get", "/api/v1/export"), ("get", "/api/v1/audit")} <= operations
    assert set(document["components"]["securitySchemes"]) == {"token", "session"}
