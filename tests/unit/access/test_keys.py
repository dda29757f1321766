"""API keys: the file holds only salted hashes; `bgremove keys` adds, lists and revokes; the
gateway's key store verifies in constant time, by id, and follows the file as it changes."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from bgremove_gateway.access.control import KeyStore, presented_key
from bgremove_gateway.access.keys import KeyFileError, KeyLimits, PresentedKey, new_key, read_keys, write_keys
from bgremove_gateway.cli import main
from bgremove_gateway.errors import ServiceError


def add(path: Path, capsys: pytest.CaptureFixture[str], name: str, *flags: str) -> tuple[str, str]:
    """Runs `bgremove keys add`; returns (key printed on stdout, its id)."""
    assert main(["keys", "add", name, "--file", str(path), *flags]) == 0
    key = capsys.readouterr().out.strip()
    parsed = PresentedKey.parse(key)
    assert parsed is not None, key
    return key, parsed.id


def test_add_prints_the_key_once_and_stores_only_a_salted_hash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.json"
    key, key_id = add(path, capsys, "acme", "--rate", "2.5", "--burst", "5", "--max-streams", "3")
    secret = PresentedKey.parse(key).secret  # type: ignore[union-attr]
    text = path.read_text()
    assert secret not in text and key not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (entry,) = json.loads(text)["keys"]
    assert entry["id"] == key_id and entry["name"] == "acme" and entry["revoked"] is None
    assert (entry["rate"], entry["burst"], entry["max_streams"]) == (2.5, 5, 3)
    assert entry["hash"]["alg"] == "scrypt" and len(entry["hash"]["salt"]) >= 20
    # The same secret under another salt hashes differently: salts are per key.
    other, _ = add(path, capsys, "other")
    salts = {k["hash"]["salt"] for k in json.loads(path.read_text())["keys"]}
    assert len(salts) == 2 and other != key


def test_list_shows_ids_names_limits_and_status_but_no_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.json"
    key, key_id = add(path, capsys, "acme", "--rate", "3")
    _, other_id = add(path, capsys, "billing")
    assert main(["keys", "revoke", other_id, "--file", str(path)]) == 0
    capsys.readouterr()
    assert main(["keys", "list", "--file", str(path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == {key_id, other_id}
    assert "active" in rows[key_id] and "acme" in rows[key_id] and " 3 " in rows[key_id]
    assert "revoked" in rows[other_id] and "billing" in rows[other_id]
    record = {r["id"]: r for r in json.loads(path.read_text())["keys"]}
    assert key.split("_", 2)[2] not in out
    assert record[key_id]["hash"]["digest"] not in out


def test_revoking_an_unknown_id_fails_with_a_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.json"
    add(path, capsys, "acme")
    assert main(["keys", "revoke", "0123456789ab", "--file", str(path)]) == 1
    assert "no key 0123456789ab" in capsys.readouterr().err


def test_keys_file_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "env-keys.json"
    monkeypatch.setenv("BGREMOVE_API_KEYS_FILE", str(path))
    assert main(["keys", "add", "from-env"]) == 0
    assert [r.name for r in read_keys(path)] == ["from-env"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ("not json", "is not JSON"),
        ('{"keys": {}}', '"keys" list'),
        ('{"keys": [{"id": "XYZ"}]}', '"id" must be 12 lowercase hex'),
        ('{"keys": [{"id": "0123456789ab", "hash": {"alg": "md5"}}]}', '"alg": "scrypt"'),
        ('{"keys": [{"id": "0123456789ab", "rate": -1}]}', '"rate" must be a number >= 0'),
    ],
)
def test_malformed_keys_file_names_the_problem(tmp_path: Path, body: str, words: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(body)
    with pytest.raises(KeyFileError, match=words) as caught:
        read_keys(path)
    assert str(path) in str(caught.value)


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    record, _ = new_key("a", KeyLimits())
    path = tmp_path / "keys.json"
    write_keys(path, [record, record])
    with pytest.raises(KeyFileError, match="appears twice"):
        read_keys(path)


def test_the_charts_empty_keys_document_loads(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text('{"keys": []}')
    assert len(KeyStore(path)) == 0


def test_a_missing_keys_file_tells_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="bgremove keys add NAME --file"):
        KeyStore(tmp_path / "absent.json")


# --- what callers send ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ([], None),
        ([("authorization", "Bearer k1")], "k1"),
        ([("authorization", "bearer   k1 ")], "k1"),
        ([("x-api-key", "k2")], "k2"),
        ([("authorization", "Bearer k3"), ("x-api-key", "k3")], "k3"),
        ([("user-agent", "x"), ("traceparent", "00-ab-cd-01")], None),
    ],
)
def test_key_from_bearer_or_x_api_key(metadata: list[tuple[str, str]], expected: str | None) -> None:
    assert presented_key(metadata) == expected


@pytest.mark.parametrize(
    "metadata",
    [
        [("authorization", "Basic dXNlcjpwdw==")],
        [("authorization", "Bearer")],
        [("authorization", "Bearer a"), ("x-api-key", "b")],
    ],
)
def test_unusable_authorization_is_unauthenticated(metadata: list[tuple[str, str]]) -> None:
    with pytest.raises(ServiceError) as caught:
        presented_key(metadata)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "text", ["", "bgr_", "bgr_0123456789ab", "bgr_0123456789AB_" + "a" * 43, "xyz_0123456789ab_" + "a" * 43]
)
def test_malformed_keys_do_not_parse(text: str) -> None:
    assert PresentedKey.parse(text) is None


# --- the gateway's key store ----------------------------------------------------------------------


def store_with(tmp_path: Path, *names: str) -> tuple[KeyStore, dict[str, str]]:
    path = tmp_path / "keys.json"
    records, keys = [], {}
    for name in names:
        record, key = new_key(name, KeyLimits(rate=1, burst=1, max_streams=1))
        records.append(record)
        keys[name] = key
    write_keys(path, records)
    return KeyStore(path), keys


async def test_right_key_verifies_and_wrong_ones_are_refused(tmp_path: Path) -> None:
    store, keys = store_with(tmp_path, "a", "b")
    good = PresentedKey.parse(keys["a"])
    assert good is not None
    record = await store.verify(good)
    assert record.name == "a" and record.limits == KeyLimits(rate=1, burst=1, max_streams=1)
    # Twice: the second time from the per-process cache, same answer.
    assert (await store.verify(good)).id == record.id
    other = PresentedKey.parse(keys["b"])
    assert other is not None
    for wrong in (
        PresentedKey(good.id, other.secret),  # a real secret under another key's id
        PresentedKey(good.id, good.secret[:-1] + ("A" if good.secret[-1] != "A" else "B")),
        PresentedKey("0123456789ab", good.secret),  # unknown id
    ):
        with pytest.raises(ServiceError) as caught:
            await store.verify(wrong)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert caught.value.message == "invalid API key"
    # A wrong secret does not evict the right one.
    assert (await store.verify(good)).id == record.id


async def test_revocation_and_new_keys_are_picked_up_from_the_file(tmp_path: Path) -> None:
    store, keys = store_with(tmp_path, "a")
    presented = PresentedKey.parse(keys["a"])
    assert presented is not None
    await store.verify(presented)
    assert store.reload_if_changed() is False
    records = read_keys(store.path)
    record, new = new_key("late", KeyLimits())
    write_keys(store.path, [*(replace(r, revoked="2026-01-01T00:00:00Z") for r in records), record])
    assert store.reload_if_changed() is True
    with pytest.raises(ServiceError, match="was revoked at 2026-01-01T00:00:00Z"):
        await store.verify(presented)
    late = PresentedKey.parse(new)
    assert late is not None and (await store.verify(late)).name == "late"


async def test_a_broken_file_keeps_the_keys_last_read(tmp_path: Path) -> None:
    store, keys = store_with(tmp_path, "a")
    store.path.write_text("{ half written")
    os.utime(store.path, ns=(1, 1))
    assert store.reload_if_changed() is False
    presented = PresentedKey.parse(keys["a"])
    assert presented is not None and (await store.verify(presented)).name == "a"


async def test_guessing_never_blocks_the_event_loop(tmp_path: Path) -> None:
    store, keys = store_with(tmp_path, "a")
    good = PresentedKey.parse(keys["a"])
    assert good is not None
    guesses = [PresentedKey(good.id, f"guess{i:040d}") for i in range(4)]
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    loop = asyncio.get_running_loop()
    started = loop.time()
    results = await asyncio.gather(*(store.verify(g) for g in guesses), return_exceptions=True)
    elapsed = loop.time() - started
    task.cancel()
    assert all(isinstance(r, ServiceError) for r in results)
    # Four scrypt runs happened one after another in a worker thread while the loop kept ticking.
    assert ticks >= 0.3 * elapsed / 0.005
