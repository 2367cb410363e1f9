"""Schema fuzzing with schemathesis over the daemon's own /openapi.json: every route, a
bounded number of generated requests each. No 5xx, and every response matches its documented
status, content type and schema."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from myllm.registry.store import Overrides, Registry
from myllm.settings import Settings
from tests.conftest import writable_home
from tests.server import running_server

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_url(models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = writable_home(models_home, tmp_path_factory.mktemp("fuzz") / "home")
    registry = Registry.open(Settings(home=home))
    # num_predict 8: bounded replies when no max_tokens is sent
    registry.copy("smollm2:135m", "fuzz", Overrides(parameters={"num_predict": 8}))
    registry.close()
    with running_server(Settings(home=home, num_threads=2, num_ctx=256, default_model="fuzz", load_timeout="5s")) as url:
        yield url


def _operations() -> list[tuple[str, str]]:
    """Every (method, path) the app documents, read from the app itself (no server needed)."""
    from myllm.api.app import create_app

    paths = create_app(Settings()).openapi()["paths"]
    return [(method.upper(), path) for path, item in paths.items() for method in item]


@pytest.mark.parametrize(("method", "path"), _operations())
def test_every_route(fuzz_url: str, method: str, path: str) -> None:
    operation = schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")[path][method]

    @given(case=operation.as_strategy())
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
    def fuzz(case) -> None:  # type: ignore[no-untyped-def]
        case.call_and_validate(base_url=fuzz_url, checks=CHECKS, timeout=60)

    fuzz()
