"""API keys, per-key limits and fairness, and the access log, against the real gateway.

The gateway here has a keys file and reuses the session gateway's embedded Triton, so the model
work is real. Raw gRPC stubs play the callers, so nothing in the client library hides a status.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from skimage import data as skdata

from bgremove import AsyncClient, BgRemoveError
from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from bgremove_gateway.access.keys import KeyLimits, PresentedKey, new_key, write_keys
from bgremove_gateway.access.log import FIELDS
from e2e_helpers import jpeg_bytes, upload_messages
from service_harness import BGREMOVE, GatewayProcess

JPEG = jpeg_bytes(skdata.chelsea())
KEY_LIMITS = {
    "light": KeyLimits(rate=0, burst=0, max_streams=0),
    "heavy": KeyLimits(rate=1, burst=1, max_streams=1),
    "burst": KeyLimits(rate=1, burst=2, max_streams=0),
    "capped": KeyLimits(rate=0, burst=0, max_streams=2),
    "revocable": KeyLimits(),
    "logged": KeyLimits(rate=0, burst=0, max_streams=0),
}


@dataclass
class Keyed:
    gateway: GatewayProcess
    file: Path
    keys: dict[str, str]

    def id(self, name: str) -> str:
        parsed = PresentedKey.parse(self.keys[name])
        assert parsed is not None
        return parsed.id

    def bearer(self, name: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.keys[name]}")]


@pytest.fixture(scope="module")
def keyed(gateway: GatewayProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    path = tmp_path_factory.mktemp("auth") / "keys.json"
    records, keys = [], {}
    for name, limits in KEY_LIMITS.items():
        record, keys[name] = new_key(name, limits)
        records.append(record)
    write_keys(path, records)
    gw = GatewayProcess(
        args=["--api-keys-file", str(path), "--triton-url", f"127.0.0.1:{gateway.triton_grpc_port}"]
    )
    gw.start()
    try:
        gw.wait_serving()
        yield Keyed(gw, path, keys)
    finally:
        gw.stop()
        log = gw.log_text()
        # Whatever happened in this module, no key (nor its secret half) reached the log.
        for key in keys.values():
            assert key not in log and key.split("_", 2)[2] not in log


def stream(target: str, metadata: list[tuple[str, str]] | None, data: bytes = JPEG) -> pb.ResultHeader:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.BackgroundRemovalStub(channel)
        responses = stub.StreamRemoveBackground(
            upload_messages(data, "image/jpeg"), metadata=metadata, timeout=60
        )
        header = next(iter(responses)).header
        for _ in responses:
            pass
        return header


def refused(target: str, metadata: list[tuple[str, str]] | None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stream(target, metadata)
    return caught.value


def retry_delay(err: grpc.RpcError) -> float | None:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    info = error_details_pb2.RetryInfo()
    for detail in status.details if status else ():
        if detail.Unpack(info):
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


def test_valid_keys_in_either_header_are_admitted(keyed: Keyed) -> None:
    target = keyed.gateway.target
    assert stream(target, keyed.bearer("light")).width == 451
    assert stream(target, [("x-api-key", keyed.keys["light"])]).width == 451
    with grpc.insecure_channel(target) as channel:
        info = pb_grpc.BackgroundRemovalStub(channel).GetServiceInfo(
            pb.GetServiceInfoRequest(), metadata=keyed.bearer("light"), timeout=10
        )
    assert info.default_model == "u2netp"


@pytest.mark.parametrize(
    ("metadata", "words"),
    [
        (None, "requires an API key: send `authorization: Bearer <key>` or `x-api-key: <key>`"),
        ([("authorization", "Bearer bgr_0123456789ab_" + "A" * 43)], "invalid API key"),
        ([("x-api-key", "not-a-key")], "malformed API key"),
        ([("authorization", "Basic dXNlcjpwYXNz")], "must be `Bearer <API key>`"),
    ],
)
def test_missing_unknown_or_malformed_keys_are_unauthenticated(
    keyed: Keyed, metadata: list[tuple[str, str]] | None, words: str
) -> None:
    err = refused(keyed.gateway.target, metadata)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert words in (err.details() or "")
    with grpc.insecure_channel(keyed.gateway.target) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.BackgroundRemovalStub(channel).GetServiceInfo(pb.GetServiceInfoRequest(), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_real_secret_under_another_keys_id_is_refused(keyed: Keyed) -> None:
    forged = f"bgr_{keyed.id('light')}_{keyed.keys['heavy'].split('_', 2)[2]}"
    err = refused(keyed.gateway.target, [("x-api-key", forged)])
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_need_no_key(keyed: Keyed) -> None:
    assert keyed.gateway.health("bgremove.v1.BackgroundRemoval") == health_pb2.HealthCheckResponse.SERVING
    grpcurl = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    assert grpcurl
    out = subprocess.run(
        [grpcurl, "-plaintext", keyed.gateway.target, "list"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert "bgremove.v1.BackgroundRemoval" in out.stdout.split()


def test_over_the_rate_is_resource_exhausted_with_retry_info(keyed: Keyed) -> None:
    """rate 1/s, burst 2: two calls at once pass, the third waits for a token."""
    target, metadata = keyed.gateway.target, keyed.bearer("burst")
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.BackgroundRemovalStub(channel)
        for _ in range(2):
            stub.GetServiceInfo(pb.GetServiceInfoRequest(), metadata=metadata, timeout=10)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetServiceInfo(pb.GetServiceInfoRequest(), metadata=metadata, timeout=10)
    err = caught.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"API key {keyed.id('burst')} is over its rate limit of 1 requests/s (burst 2)" in (
        err.details() or ""
    )
    delay = retry_delay(err)
    assert delay is not None and 0 < delay <= 1.0
    time.sleep(delay)
    assert stream(target, metadata).width == 451


async def held_upload(data: bytes, release: asyncio.Event) -> AsyncIterator[pb.UploadRequest]:
    """A JPEG upload that sends its header, then holds its chunks back until `release` is set:
    the call stays admitted and in flight for as long as the test needs."""
    messages = list(upload_messages(data, "image/jpeg"))
    yield messages[0]
    await release.wait()
    for message in messages[1:]:
        yield message


async def test_stream_cap_refuses_the_call_over_it_until_one_finishes(keyed: Keyed) -> None:
    release = asyncio.Event()

    def held() -> AsyncIterator[pb.UploadRequest]:
        return held_upload(JPEG, release)

    async with grpc.aio.insecure_channel(keyed.gateway.target) as channel:
        stub = pb_grpc.BackgroundRemovalStub(channel)
        metadata = keyed.bearer("capped")

        async def call(requests: AsyncIterator[pb.UploadRequest]) -> int:
            sizes = 0
            async for message in stub.StreamRemoveBackground(requests, metadata=metadata, timeout=60):
                sizes += len(message.chunk)
            return sizes

        open_calls = [asyncio.create_task(call(held())) for _ in range(2)]
        await asyncio.sleep(1.0)  # both are admitted and waiting for their chunks
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(held())
        err = caught.value
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "already has 2 calls in flight, its limit is 2" in (err.details() or "")
        assert retry_delay(err) is not None  # type: ignore[arg-type]
        release.set()
        assert all(size > 0 for size in await asyncio.gather(*open_calls))
        assert await call(held()) > 0  # slots are free again


async def test_refusals_reach_asyncio_clients_intact(keyed: Keyed) -> None:
    """grpcio's asyncio client turns a status that arrives while it is still writing into
    INTERNAL (grpc/grpc#36066); the gateway reads out the upload first, so the caller always sees
    RESOURCE_EXHAUSTED with its RetryInfo, through the bgremove AsyncClient as well."""
    photo = jpeg_bytes(skdata.astronaut(), quality=100)  # several chunks
    async with AsyncClient(keyed.gateway.target, api_key=keyed.keys["capped"], chunk_size=16384) as client:
        release = asyncio.Event()

        async with grpc.aio.insecure_channel(keyed.gateway.target) as channel:
            stub = pb_grpc.BackgroundRemovalStub(channel)
            blockers = [
                stub.StreamRemoveBackground(
                    held_upload(photo, release), metadata=keyed.bearer("capped"), timeout=60
                )
                for _ in range(2)
            ]
            await asyncio.sleep(1.0)
            outcomes = await asyncio.gather(
                *(client.remove(photo) for _ in range(20)), return_exceptions=True
            )
            release.set()
            for blocker in blockers:
                async for _ in blocker:
                    pass
    codes = [o.code for o in outcomes if isinstance(o, BgRemoveError)]
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 20
    assert all(o.retry_after_s for o in outcomes if isinstance(o, BgRemoveError))


def test_a_revoked_key_is_refused_without_a_restart(keyed: Keyed) -> None:
    target, metadata = keyed.gateway.target, keyed.bearer("revocable")
    assert stream(target, metadata).width == 451
    out = subprocess.run(
        [BGREMOVE, "keys", "revoke", keyed.id("revocable"), "--file", str(keyed.file)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            stream(target, metadata)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            assert f"API key {keyed.id('revocable')} was revoked at" in (err.details() or "")
            break
        time.sleep(0.5)
    else:
        pytest.fail("the revoked key was still admitted 20 s after `bgremove keys revoke`")
    assert stream(target, keyed.bearer("light")).width == 451  # other keys unaffected


async def test_one_keys_flood_does_not_starve_another(keyed: Keyed) -> None:
    """The heavy key (1/s, 1 stream) floods from 16 tasks that call again at once, ignoring
    RetryInfo; the light key keeps its latency: p50 during the flood within 3x of p50 alone.
    Quiet and flooded rounds alternate so that both see the same background load on a shared
    machine. Measured here: 1.6-2.1x. For contrast (measured once, 8 flooders): with the heavy key
    unlimited 4.5x, and with limits but refusals answered at once (no pause) 11.8x."""
    target = keyed.gateway.target

    async def one(stub: pb_grpc.BackgroundRemovalStub, metadata: list[tuple[str, str]]) -> float:
        started = time.perf_counter()
        async for _ in stub.StreamRemoveBackground(
            upload_messages(JPEG, "image/jpeg"), metadata=metadata, timeout=120
        ):
            pass
        return time.perf_counter() - started

    outcomes: dict[str, int] = {}

    async def flood(heavy: pb_grpc.BackgroundRemovalStub, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await one(heavy, keyed.bearer("heavy"))
                outcome = "OK"
            except grpc.aio.AioRpcError as err:
                outcome = err.code().name
                if retry_delay(err) is None:  # type: ignore[arg-type]
                    outcome += " without RetryInfo"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    alone: list[float] = []
    during: list[float] = []
    async with grpc.aio.insecure_channel(target) as light_ch, grpc.aio.insecure_channel(target) as heavy_ch:
        light, heavy = pb_grpc.BackgroundRemovalStub(light_ch), pb_grpc.BackgroundRemovalStub(heavy_ch)
        for _ in range(2):
            await one(light, keyed.bearer("light"))
        for _ in range(3):
            alone += [await one(light, keyed.bearer("light")) for _ in range(4)]
            stop = asyncio.Event()
            flooders = [asyncio.create_task(flood(heavy, stop)) for _ in range(16)]
            await asyncio.sleep(1.0)
            during += [await one(light, keyed.bearer("light")) for _ in range(4)]
            stop.set()
            await asyncio.gather(*flooders)

    p50_alone, p50_during = statistics.median(alone), statistics.median(during)
    assert set(outcomes) == {"OK", "RESOURCE_EXHAUSTED"}, outcomes
    assert outcomes["RESOURCE_EXHAUSTED"] > 5 * outcomes["OK"], outcomes  # throttled, not shut out
    ratio = p50_during / p50_alone
    print(f"light p50 alone {p50_alone:.3f}s, during flood {p50_during:.3f}s: {ratio:.2f}x; heavy {outcomes}")
    assert ratio <= 3.0, f"light key p50 went from {p50_alone:.3f}s to {p50_during:.3f}s ({ratio:.2f}x)"


ACCESS_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO bgremove\.access (?P<fields>.*)$")


def access_lines(gw: GatewayProcess) -> list[dict[str, str]]:
    lines = []
    for line in list(gw.lines):
        match = ACCESS_LINE.match(line)
        if match:
            lines.append(dict(pair.split("=", 1) for pair in match["fields"].split(" ")))
    return lines


def test_one_access_line_per_request_with_only_the_agreed_fields(keyed: Keyed) -> None:
    gw, key_id = keyed.gateway, keyed.id("logged")
    before = len(access_lines(gw))
    stream(gw.target, keyed.bearer("logged"))
    with grpc.insecure_channel(gw.target) as channel:
        stub = pb_grpc.BackgroundRemovalStub(channel)
        stub.RemoveBackground(
            pb.RemoveBackgroundRequest(image=JPEG, content_type="image/jpeg"),
            metadata=keyed.bearer("logged"),
            timeout=60,
        )
    with pytest.raises(grpc.RpcError):
        stream(gw.target, keyed.bearer("logged"), data=JPEG[:2000])  # truncated: INVALID_ARGUMENT
    refused(gw.target, None)  # UNAUTHENTICATED
    with grpc.insecure_channel(gw.target) as channel:
        pb_grpc.BackgroundRemovalStub(channel).GetServiceInfo(
            pb.GetServiceInfoRequest(), metadata=keyed.bearer("logged"), timeout=10
        )
    expected = [
        ("StreamRemoveBackground", "OK", key_id),
        ("RemoveBackground", "OK", key_id),
        ("StreamRemoveBackground", "INVALID_ARGUMENT", key_id),
        ("StreamRemoveBackground", "UNAUTHENTICATED", "-"),
        ("GetServiceInfo", "OK", key_id),
    ]
    deadline = time.monotonic() + 5
    while len(access_lines(gw)) < before + len(expected) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # and no extra line comes late
    lines = access_lines(gw)[before:]
    assert [(f["method"], f["status"], f["key"]) for f in lines] == expected
    for fields in lines:
        assert tuple(fields) == FIELDS
        assert re.fullmatch(r"ipv4:127\.0\.0\.1:\d+", fields["peer"])
        assert float(fields["latency_ms"]) >= 0
        assert fields["trace_id"] == "-" or re.fullmatch(r"[0-9a-f]{32}", fields["trace_id"])
    ok_stream, ok_unary, bad, anonymous, info = lines
    assert int(ok_stream["bytes_in"]) == len(JPEG) and int(ok_stream["bytes_out"]) > 0
    assert int(ok_unary["bytes_in"]) == len(JPEG) and int(ok_unary["bytes_out"]) > 0
    assert int(bad["bytes_out"]) == 0 and int(anonymous["bytes_in"]) == 0
    assert int(info["bytes_in"]) == 0 and int(info["bytes_out"]) > 0
