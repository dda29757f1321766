"""POST /v1.0/removebg, remove.bg's API, on the gateway's Pipeline: the same keys, per-key rates,
memory admission, tracing, access log and metrics as the gRPC servicer. A Starlette app.

One request: trace context from `traceparent`, a SERVER span; the caller identified and admitted by
the AccessControl; a slot and memory from the MemoryBudget; the body read in memory (form.py), its
parameters mapped (params.py); the Pipeline run; the image or JSON answered (responses.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc
from opentelemetry import propagate, trace
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from bgremove_gateway.access.control import AccessControl, Policy, Refused, paced, presented_key
from bgremove_gateway.access.limits import Allowance
from bgremove_gateway.access.log import Access, caller
from bgremove_gateway.access.tls import is_loopback
from bgremove_gateway.errors import NOT_READY_RETRY_AFTER_S, ServiceError, invalid
from bgremove_gateway.http.fetch import UrlFetcher, refused
from bgremove_gateway.http.form import check_declared_length, check_media_type, read_chunks, read_form
from bgremove_gateway.http.params import RemoveBgRequest, parse_request
from bgremove_gateway.http.responses import (
    HttpError,
    HttpStatus,
    error_response,
    rate_headers,
    result_headers,
    result_json,
)
from bgremove_gateway.pipeline.decode import SUPPORTED_CONTENT_TYPES, SUPPORTED_LIST, sniff_content_type
from bgremove_gateway.pipeline.flow import Pipeline, Result
from bgremove_gateway.pipeline.upload import Upload, validate_options
from bgremove_gateway.runtime import metrics
from bgremove_gateway.runtime.budget import MemoryBudget, Ticket
from bgremove_gateway.runtime.memory import IdleTrim
from bgremove_gateway.service.servicer import ServingState

log = logging.getLogger("bgremove.gateway")
tracer = trace.get_tracer("bgremove.gateway")

PATH: Final = "/v1.0/removebg"
# The access log's and the metrics' method label, beside the gRPC methods' names.
METHOD: Final = "http:removebg"
UI_DIR: Final = Path(__file__).resolve().parent / "ui"
# Form overhead on top of a base64 image of the upload limit: parameter parts, boundaries.
BODY_OVERHEAD_BYTES: Final = 64 * 1024


def max_body_bytes(max_upload_bytes: int) -> int:
    """The largest body: an image of the upload limit in base64 (4/3 its size), and the form around it."""
    return -(-max_upload_bytes * 4 // 3) + BODY_OVERHEAD_BYTES


class _Peer:
    """What Access reads from a call: its peer (grpc's "ipv4:host:port" form) and no deadline."""

    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> None:
        return None


def http_policy(grpc_policy: Policy, http_listen: str, insecure: bool) -> Policy:
    """The gRPC listener's rules for the HTTP one, which has no TLS and so no client certificates:
    the same keys; off loopback a key is required unless --insecure; and a gateway that knows its
    callers only by certificate lets nobody in over HTTP."""
    off_loopback = not is_loopback(http_listen) and not insecure
    return Policy(
        keys=grpc_policy.keys,
        client_certs=False,
        require_auth=off_loopback or grpc_policy.client_certs,
    )


def peer_of(request: Request) -> str:
    client = request.client
    if client is None:
        return "-"
    host, port = client.host, client.port
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


@dataclass
class HttpApi:
    """What the HTTP API shares with the gRPC servicer; `fetcher` None: URL parameters refused."""

    pipeline: Pipeline
    state: ServingState
    budget: MemoryBudget
    access_control: AccessControl
    idle_trim: IdleTrim
    fetcher: UrlFetcher | None = None

    async def remove_background(self, request: Request) -> Response:
        started = time.perf_counter()
        parent = propagate.extract(dict(request.headers))
        with tracer.start_as_current_span(
            f"POST {PATH}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": "POST", "url.path": PATH},
        ) as span:
            access = Access(METHOD, _Peer(peer_of(request)), started, key="-")  # type: ignore[arg-type]
            response = await self._answer(request, access, started)
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 500:
                span.set_status(trace.StatusCode.ERROR)
            return response

    async def _answer(self, request: Request, access: Access, started: float) -> Response:
        async with contextlib.AsyncExitStack() as stack:
            try:
                admitted = await self.access_control.admit(
                    stack, lambda: presented_key(request.headers.items()), access.peer, None
                )
            except Refused as no:
                access.key, access.code = no.key_id, no.error.code
                err = await paced(no.error, started)
                access.done()
                return error_response(err, _refused_rate_headers(no, err), by_key=True)
            access.key = admitted.key_id
            caller.set(admitted.key_id)  # each request runs in its own task and context
            headers = rate_headers(admitted.allowance)
            ticket = self.budget.ticket()
            self.idle_trim.enter()
            try:
                result = await self._run(request, access, ticket)
                return self._result(request, access, result, headers)
            except ServiceError as err:
                access.code = err.code
                return error_response(err, headers)
            except ClientDisconnect:
                # The caller went away mid-body: nobody reads this answer, but the server logs nothing.
                access.ended_by_caller()
                return error_response(ServiceError(grpc.StatusCode.CANCELLED, "the client disconnected"), {})
            except asyncio.CancelledError:
                access.ended_by_caller()
                raise
            except Exception:
                access.code = grpc.StatusCode.INTERNAL
                log.exception("unexpected failure in %s", METHOD)
                return error_response(ServiceError(grpc.StatusCode.INTERNAL, "internal error"), headers)
            finally:
                ticket.release()
                self.idle_trim.leave()
                access.done()
        raise AssertionError("unreachable")  # mypy: the stack never swallows

    def _result(self, request: Request, access: Access, result: Result, headers: dict[str, str]) -> Response:
        out = {**headers, **result_headers(result.header)}
        if "application/json" in request.headers.get("accept", ""):
            body = result_json(result.header, result.data)
            access.bytes_out = len(body)
            return Response(body, 200, out, media_type="application/json")
        access.bytes_out = len(result.data)
        return Response(result.data, 200, out, media_type=result.header.content_type)

    async def _run(self, request: Request, access: Access, ticket: Ticket) -> Result:
        pipeline = self.pipeline
        limits = pipeline.settings.limits
        if not self.state.ready:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                f"the service is not ready: {self.state.reason}",
                retry_after_s=NOT_READY_RETRY_AFTER_S,
            )
        ticket.enter()
        max_body = max_body_bytes(limits.max_upload_bytes)
        check_declared_length(request.headers.get("content-length"), max_body)
        content_type = request.headers.get("content-type", "")
        check_media_type(content_type)

        def charge(nbytes: int) -> None:
            access.bytes_in += nbytes
            ticket.reserve(nbytes, f"a request body of {access.bytes_in} bytes")

        chunks = read_chunks(request.stream(), max_body, limits.upload_timeout_s, charge)
        with tracer.start_as_current_span("validate"), metrics.timed_step("validate"):
            form = await read_form(content_type, chunks)
            parsed = parse_request(form, limits.max_upload_bytes)
            del form
            # The parsed copies of what the body held (base64 decoded, parts joined).
            ticket.reserve(len(parsed.image or b"") + len(parsed.options.bg_image), "the request's images")
            await self._fetch(parsed, ticket)
            parsed.settle_format()
            validate_options(parsed.options, limits, pipeline.models)
            assert parsed.image is not None
            source = "image_url" if parsed.image_url is not None else "image_file"
            content_type = _image_type(source, parsed.image)
        options = parsed.options
        access.output_format = metrics.format_label(options.format)
        access.model = options.model or pipeline.settings.default_model
        upload = Upload(data=parsed.image, content_type=content_type, options=options)
        return await pipeline.run(upload, ticket=ticket)

    async def _fetch(self, parsed: RemoveBgRequest, ticket: Ticket) -> None:
        """image_url and bg_image_url's bytes, charged to the budget, or the refusal of URLs."""
        for name in ("image_url", "bg_image_url"):
            url = getattr(parsed, name)
            if url is None:
                continue
            if self.fetcher is None:
                raise refused(name)
            data = await self.fetcher.fetch(name, url)
            ticket.reserve(len(data), f"{name}'s {len(data)} bytes")
            if name == "image_url":
                parsed.image = data
            else:
                parsed.options.bg_image = data


def _refused_rate_headers(no: Refused, err: ServiceError) -> dict[str, str]:
    """X-RateLimit-* for a verified key that was refused: nothing left until the wait is over."""
    if no.limits is None or no.limits.rate <= 0:
        return {}
    return rate_headers(Allowance(no.limits.burst, 0, err.retry_after_s or 0.0))


def _image_type(name: str, data: bytes) -> str:
    sniffed = sniff_content_type(data)
    if sniffed not in SUPPORTED_CONTENT_TYPES:
        what = f"a {sniffed} image" if sniffed else "no image format known here"
        raise invalid(name, f"{name} is {what}; supported: {SUPPORTED_LIST}")
    return sniffed


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such path, wrong method) in remove.bg's error shape."""
    assert isinstance(exc, HTTPException)
    code = "not_found" if exc.status_code == 404 else "method_not_allowed"
    if exc.status_code == 405:
        detail = f"{request.method} is not allowed here: POST {PATH}"
    else:
        detail = f"no such path: the API is POST {PATH}"
    status = HttpStatus(exc.status_code, str(exc.detail), code)
    return error_response(HttpError(grpc.StatusCode.NOT_FOUND, detail, http=status), dict(exc.headers or {}))


def create_app(api: HttpApi, *, ui: bool = False) -> Starlette:
    """The HTTP API's app; `ui`: also the browser page of http/ui/ at GET /."""
    routes: list[Route | Mount] = [Route(PATH, api.remove_background, methods=["POST"])]
    if ui:
        routes.append(Mount("/", StaticFiles(directory=UI_DIR, html=True)))
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
