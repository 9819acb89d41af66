"""API fixtures shared by several test modules (the service-wide ones are in tests/service)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import ServiceStore, make_settings, wait_ready


@pytest.fixture(scope="module")
def generate_client(
    service_store: ServiceStore, request: pytest.FixtureRequest
) -> Iterator[TestClient]:
    """A ready app serving ``ali`` (generate) and ``lin`` (encode), shared by a test module.
    Its ``max_new_tokens_limit`` is the module's ``LIMIT`` (the bounds its tests check)."""
    limit = int(request.module.LIMIT)
    settings = make_settings(service_store.root, models=["ali", "lin"], max_new_tokens_limit=limit)
    with TestClient(create_app(settings)) as test_client:
        wait_ready(test_client)
        yield test_client
