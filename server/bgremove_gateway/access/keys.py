"""API keys: made once, shown once, kept only as salted scrypt hashes in a JSON keys file.

A key reads ``bgr_<id>_<secret>``. The id (12 hex digits) is not secret: it names the key in the
file, in `bgremove keys list` and in the access log, and it makes verification one dictionary
lookup plus one hash, however many keys there are. The secret is 32 random bytes; the file holds
only scrypt(secret, per-key salt), compared in constant time.

The file, as `bgremove keys` writes it (and as a Kubernetes Secret may carry it)::

    {"version": 1, "keys": [{"id": "3f9a0c1b2d4e", "name": "acme", "created": "2026-11-23T10:00:00Z",
      "hash": {"alg": "scrypt", "n": 16384, "r": 8, "p": 1, "salt": "<base64>", "digest": "<base64>"},
      "rate": 10.0, "burst": 20, "max_streams": 4, "revoked": null}]}
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

PREFIX = "bgr"
ID_HEX_DIGITS = 12
SECRET_BYTES = 32
SALT_BYTES = 16
# scrypt's interactive-login cost (about 50 ms and 16 MiB here). The secret is 256 random bits, so
# the cost only slows an attacker who stole the file; the gateway pays it once per key per process.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024
_KEY = re.compile(rf"^{PREFIX}_(?P<id>[0-9a-f]{{{ID_HEX_DIGITS}}})_(?P<secret>[A-Za-z0-9_-]{{20,128}})$")

DEFAULT_RATE = 10.0
DEFAULT_BURST = 20
DEFAULT_MAX_STREAMS = 4


class KeyFileError(ValueError):
    """The keys file cannot be read or is malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class KeyLimits:
    """Per-key admission limits; 0 means unlimited."""

    rate: float = DEFAULT_RATE  # requests per second, refilled continuously
    burst: int = DEFAULT_BURST  # requests that may arrive at once after a quiet period
    max_streams: int = DEFAULT_MAX_STREAMS  # calls in flight at the same time


@dataclass(frozen=True)
class ScryptHash:
    salt: bytes
    digest: bytes
    n: int = SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P

    @classmethod
    def of(cls, secret: str) -> ScryptHash:
        salt = os.urandom(SALT_BYTES)
        return cls(salt=salt, digest=_scrypt(secret, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P))

    def matches(self, secret: str) -> bool:
        return hmac.compare_digest(_scrypt(secret, self.salt, self.n, self.r, self.p), self.digest)

    def to_json(self) -> dict[str, Any]:
        return {
            "alg": "scrypt",
            "n": self.n,
            "r": self.r,
            "p": self.p,
            "salt": base64.b64encode(self.salt).decode(),
            "digest": base64.b64encode(self.digest).decode(),
        }

    @classmethod
    def from_json(cls, value: Any) -> ScryptHash:
        if not isinstance(value, dict) or value.get("alg") != "scrypt":
            raise ValueError('"hash" must be an object with "alg": "scrypt"')
        cost = [value.get(k) for k in ("n", "r", "p")]
        n, r, p = (x if isinstance(x, int) and x > 0 else 0 for x in cost)
        if not n * r * p:
            raise ValueError('"hash" needs positive integers n, r and p')
        try:
            salt = base64.b64decode(value["salt"], validate=True)
            digest = base64.b64decode(value["digest"], validate=True)
        except (KeyError, TypeError, binascii.Error):
            raise ValueError('"hash" needs base64 "salt" and "digest"') from None
        if not salt or len(digest) != 32:
            raise ValueError('"hash" needs a salt and a 32-byte digest')
        return cls(salt=salt, digest=digest, n=n, r=r, p=p)


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=_SCRYPT_MAXMEM)


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    created: str
    hash: ScryptHash
    limits: KeyLimits = KeyLimits()
    revoked: str | None = None  # when, as an ISO 8601 UTC time; revoked keys are kept for the record

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "created": self.created,
            "hash": self.hash.to_json(),
            **asdict(self.limits),
            "revoked": self.revoked,
        }

    @classmethod
    def from_json(cls, value: Any) -> KeyRecord:
        if not isinstance(value, dict):
            raise ValueError('each entry of "keys" must be an object')
        key_id = value.get("id")
        if not isinstance(key_id, str) or not re.fullmatch(rf"[0-9a-f]{{{ID_HEX_DIGITS}}}", key_id):
            raise ValueError(f'"id" must be {ID_HEX_DIGITS} lowercase hex digits, got {key_id!r}')
        defaults = KeyLimits()
        rate = value.get("rate", defaults.rate)
        burst = value.get("burst", defaults.burst)
        streams = value.get("max_streams", defaults.max_streams)
        if not isinstance(rate, (int, float)) or rate < 0:
            raise ValueError(f'key {key_id}: "rate" must be a number >= 0')
        for label, number in (("burst", burst), ("max_streams", streams)):
            if not isinstance(number, int) or number < 0:
                raise ValueError(f'key {key_id}: "{label}" must be an integer >= 0')
        try:
            digest = ScryptHash.from_json(value.get("hash"))
        except ValueError as exc:
            raise ValueError(f"key {key_id}: {exc}") from None
        revoked = value.get("revoked")
        return cls(
            id=key_id,
            name=str(value.get("name", "")),
            created=str(value.get("created", "")),
            hash=digest,
            limits=KeyLimits(rate=float(rate), burst=burst, max_streams=streams),
            revoked=str(revoked) if revoked else None,
        )


@dataclass(frozen=True)
class PresentedKey:
    """A key as a caller sent it, split into its public id and its secret."""

    id: str
    secret: str

    @classmethod
    def parse(cls, text: str) -> PresentedKey | None:
        match = _KEY.match(text.strip())
        return None if match is None else cls(match["id"], match["secret"])


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def new_key(name: str, limits: KeyLimits, existing: frozenset[str] = frozenset()) -> tuple[KeyRecord, str]:
    """A fresh record and the key itself; the key exists nowhere else and cannot be recovered."""
    key_id = secrets.token_hex(ID_HEX_DIGITS // 2)
    while key_id in existing:
        key_id = secrets.token_hex(ID_HEX_DIGITS // 2)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    record = KeyRecord(id=key_id, name=name, created=_now(), hash=ScryptHash.of(secret), limits=limits)
    return record, f"{PREFIX}_{key_id}_{secret}"


def revoked(record: KeyRecord) -> KeyRecord:
    return record if record.revoked else replace(record, revoked=_now())


def read_keys(path: Path) -> list[KeyRecord]:
    """Every record in the file (an absent file has none); KeyFileError names what is wrong."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise KeyFileError(f"cannot read keys file {path}: {exc.strerror or exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KeyFileError(f"keys file {path} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise KeyFileError(f'keys file {path} must be a JSON object with a "keys" list')
    records: list[KeyRecord] = []
    seen: set[str] = set()
    for entry in doc["keys"]:
        try:
            record = KeyRecord.from_json(entry)
        except ValueError as exc:
            raise KeyFileError(f"keys file {path}: {exc}") from None
        if record.id in seen:
            raise KeyFileError(f"keys file {path}: key id {record.id} appears twice")
        seen.add(record.id)
        records.append(record)
    return records


def write_keys(path: Path, records: list[KeyRecord]) -> None:
    """Replaces the file atomically, readable by its owner only."""
    body = json.dumps({"version": 1, "keys": [r.to_json() for r in records]}, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(body)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
