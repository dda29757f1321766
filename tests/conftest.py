from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bgremove_gateway.config import DEFAULT_MODEL_REPOSITORY
from bgremove_gateway.triton.graph import prepare_models
from service_harness import GatewayProcess, OtlpReceiver


@pytest.fixture(scope="session")
def prepared_repo() -> Path:
    """The checkout's model_repository with its graphs built, as `make models` leaves it."""
    prepare_models(DEFAULT_MODEL_REPOSITORY)
    return DEFAULT_MODEL_REPOSITORY


@pytest.fixture(scope="session")
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="session")
def gateway(otlp: OtlpReceiver, prepared_repo: Path) -> Iterator[GatewayProcess]:
    """One real gateway with its embedded Triton for the whole session, exporting traces to `otlp`."""
    gw = GatewayProcess(
        args=["--log-level", "DEBUG"],
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        },
    )
    with gw.serving():
        yield gw


@pytest.fixture(scope="session")
def peer_fixtures() -> Path:
    """rembg's own test photos and its expected U2-Net-P cut-out, vendored with its licence."""
    return Path(__file__).resolve().parent / "fixtures" / "rembg"
