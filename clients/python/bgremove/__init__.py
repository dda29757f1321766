"""Python client for the bgremove background-removal service.

    from bgremove import Client, RemoveOptions

    with Client("127.0.0.1:50051") as client:
        client.remove("photo.jpg", RemoveOptions(format="webp", crop=True)).save("cutout.webp")

The upload is streamed in chunks with a SHA-256 the server verifies; errors are BgRemoveError with
the server's gRPC status code, message and field violations. AsyncClient is the asyncio twin.
"""

from bgremove.channel import DEFAULT_TARGET, InsecureKeyWarning, __version__
from bgremove.client import AsyncClient, Client, remove
from bgremove.errors import BgRemoveError, FieldViolation
from bgremove.options import RemoveOptions
from bgremove.result import RemovalResult

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
