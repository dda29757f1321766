"""`helm test`: the gateway Service answers gRPC health SERVING and GetServiceInfo.

Runs in the gateway image (its Python has grpcio, grpcio-health-checking and the bgremove stubs).
Settings come from the environment the test pod sets; exit 0 when the service works, 1 with one
line that says what failed otherwise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc

TIMEOUT_S = 20.0


def _read(variable: str) -> bytes | None:
    """The file a variable names, None when unset or absent (an optional Secret key)."""
    path = os.environ.get(variable, "")
    return Path(path).read_bytes() if path and Path(path).is_file() else None


def _channel(target: str) -> grpc.Channel:
    if os.environ.get("BGREMOVE_TEST_TLS") != "1":
        return grpc.insecure_channel(target)
    chain, key = _read("BGREMOVE_TEST_CLIENT_CERT_FILE"), _read("BGREMOVE_TEST_CLIENT_KEY_FILE")
    if (chain is None) != (key is None):  # gRPC aborts the process on half a pair
        raise RuntimeError("the client certificate Secret needs both tls.crt and tls.key")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read("BGREMOVE_TEST_CA_FILE"), private_key=key, certificate_chain=chain
    )
    name = os.environ.get("BGREMOVE_TEST_SERVER_NAME", "")
    options = [("grpc.ssl_target_name_override", name)] if name else []
    return grpc.secure_channel(target, credentials, options=options)


def check(target: str) -> str:
    """What the service answered, in one line; raises RuntimeError with what was wrong."""
    api_key = os.environ.get("BGREMOVE_TEST_API_KEY", "")
    expect_refusal = os.environ.get("BGREMOVE_TEST_EXPECT_UNAUTHENTICATED") == "1"
    with _channel(target) as channel:
        try:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S
            )
        except grpc.RpcError as error:
            raise RuntimeError(
                f"gRPC health check on {target} failed: {error.code().name} {error.details()}"
            ) from None
        if health.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)
            raise RuntimeError(f"gRPC health on {target} is {status}, not SERVING")
        metadata = [("authorization", f"Bearer {api_key}")] if api_key else None
        try:
            info = pb_grpc.BackgroundRemovalStub(channel).GetServiceInfo(
                pb.GetServiceInfoRequest(), metadata=metadata, timeout=TIMEOUT_S
            )
        except grpc.RpcError as error:
            if expect_refusal and error.code() == grpc.StatusCode.UNAUTHENTICATED:
                return f"{target}: SERVING; GetServiceInfo without a key refused (UNAUTHENTICATED) as it must"
            raise RuntimeError(
                f"GetServiceInfo on {target} failed: {error.code().name} {error.details()}"
            ) from None
        if expect_refusal:
            raise RuntimeError(f"GetServiceInfo on {target} answered without an API key: auth is off")
        if not info.models or not info.default_model:
            raise RuntimeError(f"GetServiceInfo on {target} lists no model")
        models = ", ".join(m.name for m in info.models)
        return f"{target}: SERVING; version {info.version}, models {models}, default {info.default_model}"


def main() -> int:
    target = os.environ["BGREMOVE_TEST_TARGET"]
    try:
        print(check(target))
    except RuntimeError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
