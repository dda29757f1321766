"""Python client for the bgremove background-removal service.

    from bgremove import Client, RemoveOptions

    with Client("127.0.0.1:50051") as client:
        client.remove("photo.jpg", RemoveOptions(format="webp", crop=True)).save("cutout.webp")

The upload is streamed in chunks with a SHA-256 the server verifies; errors are BgRemoveError with
the server's gRPC status code, message and field violations. AsyncClient is the asyncio twin.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bgremove.channel import DEFAULT_TARGET, InsecureKeyWarning, __version__
    from bgremove.client import AsyncClient, Client, remove
    from bgremove.errors import BgRemoveError, FieldViolation
    from bgremove.options import RemoveOptions
    from bgremove.result import RemovalResult

# Each name is imported when first used, so importing the package (as the `bgremove` command does
# first) loads no gRPC: the command sets GRPC_VERBOSITY before gRPC reads it, once, at import.
_HOMES = {
    "DEFAULT_TARGET": "bgremove.channel",
    "InsecureKeyWarning": "bgremove.channel",
    "__version__": "bgremove.channel",
    "AsyncClient": "bgremove.client",
    "Client": "bgremove.client",
    "remove": "bgremove.client",
    "BgRemoveError": "bgremove.errors",
    "FieldViolation": "bgremove.errors",
    "RemoveOptions": "bgremove.options",
    "RemovalResult": "bgremove.result",
}

__all__ = [
    "DEFAULT_TARGET",
    "AsyncClient",
    "BgRemoveError",
    "Client",
    "FieldViolation",
    "InsecureKeyWarning",
    "RemovalResult",
    "RemoveOptions",
    "__version__",
    "remove",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'bgremove' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
