"""A caller's install: `pip install ./clients/python` in a fresh virtualenv gives the library and a
working `bgremove remove`, and none of the server's weight (Triton, ONNX Runtime, OpenCV)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from e2e_helpers import iou, jpeg_bytes, reference_mask
from service_harness import REPO, GatewayProcess, OtlpReceiver

MB = 1_000_000
# The server's packages, and the client's optional tracing: none may come with the plain client.
ABSENT = ("bgremove_gateway", "onnxruntime", "cv2", "tritonclient", "scipy", "opentelemetry.sdk")


@dataclass(frozen=True)
class Venv:
    root: Path
    # Bytes that `pip install ./clients/python` added to the fresh virtualenv's site-packages.
    installed_bytes: int

    @property
    def python(self) -> str:
        return str(self.root / "bin" / "python")

    @property
    def bgremove(self) -> str:
        return str(self.root / "bin" / "bgremove")


def _tree_bytes(path: Path) -> int:
    """Disk usage as du counts it: allocated blocks, each hard-linked file once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(directory, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def _clean_env(**extra: str) -> dict[str, str]:
    """This session's environment without its virtualenv or tracing settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONPATH") and not k.startswith("OTEL_")
    }
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    return {**env, **extra}


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Venv]:
    root = tmp_path_factory.mktemp("client-venv") / "venv"
    # The interpreter behind this session's virtualenv, so the new one shares nothing with it.
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(root)], check=True, timeout=120)
    (site,) = root.glob("lib/python*/site-packages")
    bare = _tree_bytes(site)
    subprocess.run(
        [str(root / "bin" / "python"), "-m", "pip", "install", "--quiet", str(REPO / "clients" / "python")],
        check=True,
        timeout=600,
        env=_clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1"),
        cwd=root.parent,
    )
    yield Venv(root, _tree_bytes(site) - bare)


def test_the_client_install_is_small(client_venv: Venv) -> None:
    assert client_venv.installed_bytes < 100 * MB, f"{client_venv.installed_bytes / MB:.1f} MB"


def test_the_client_install_has_none_of_the_server(client_venv: Venv) -> None:
    probe = (
        "import importlib.util, sys\n"
        "def found(name):\n"
        "    try:\n"
        "        return importlib.util.find_spec(name) is not None\n"
        "    except ModuleNotFoundError:\n"
        "        return False\n"
        "print(','.join(n for n in sys.argv[1:] if found(n)))\n"
        "import bgremove, bgremove.v1.bgremove_pb2_grpc\n"
    )
    done = subprocess.run(
        [client_venv.python, "-c", probe, *ABSENT],
        capture_output=True,
        text=True,
        timeout=60,
        env=_clean_env(),
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"importable in the client venv: {done.stdout.strip()}"


def _remove(
    venv: Venv, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`bgremove remove ARGS` from the client-only venv, as a user's shell would run it."""
    return subprocess.run(
        [venv.bgremove, "remove", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env if env is not None else _clean_env(),
        cwd=cwd,
    )


def test_help_lists_remove_and_server_commands_say_what_is_missing(client_venv: Venv) -> None:
    helped = subprocess.run(
        [client_venv.bgremove, "--help"], capture_output=True, text=True, timeout=60, env=_clean_env()
    )
    assert helped.returncode == 0, helped.stderr
    assert "remove" in helped.stdout
    served = subprocess.run(
        [client_venv.bgremove, "serve"], capture_output=True, text=True, timeout=60, env=_clean_env()
    )
    assert served.returncode == 2
    (line,) = served.stderr.splitlines()
    assert line.startswith("bgremove serve: needs the bgremove server package")


def test_client_venv_removes_a_background(client_venv: Venv, gateway: GatewayProcess, tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg_bytes(skdata.astronaut()))
    out = _remove(
        client_venv, str(photo), "-o", str(tmp_path / "out.png"), "--target", gateway.target, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    cut = Image.open(tmp_path / "out.png")
    assert cut.format == "PNG" and cut.mode == "RGBA" and cut.size == (512, 512)
    assert iou(np.asarray(cut)[..., 3] >= 128, reference_mask(Image.open(photo)) >= 128) >= 0.99


def test_without_the_tracing_extra_an_endpoint_costs_one_line(
    client_venv: Venv, gateway: GatewayProcess, otlp: OtlpReceiver, tmp_path: Path
) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg_bytes(skdata.chelsea()))
    out = _remove(
        client_venv,
        *(str(photo), "-o", str(tmp_path / "out.webp"), "--target", gateway.target),
        env=_clean_env(OTEL_EXPORTER_OTLP_ENDPOINT=otlp.endpoint),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    (line,) = out.stderr.splitlines()
    assert line.startswith("bgremove remove: warning: tracing: spans are not exported")
    assert "pip install 'bgremove-client[tracing]'" in line
    assert Image.open(tmp_path / "out.webp").format == "WEBP"


def test_client_venv_passes_on_what_the_server_says_a_file_is(
    client_venv: Venv, gateway: GatewayProcess, tmp_path: Path
) -> None:
    """Files the client does not recognise still reach the server, whose message names what they are."""
    gif = tmp_path / "in" / "anim.gif"
    gif.parent.mkdir()
    Image.new("RGB", (8, 8), "red").save(gif)
    notes = tmp_path / "in" / "notes.jpg"
    notes.write_text("not an image at all")
    lines = []
    for source in (gif, notes):
        out = _remove(client_venv, str(source), "-o", str(tmp_path / "out.png"), "--target", gateway.target)
        assert out.returncode == 1
        lines.extend(out.stderr.splitlines())
    supported = "supported: image/jpeg, image/png, image/webp"
    assert lines == [
        f"{gif}: INVALID_ARGUMENT: image/gif images are not supported; {supported}",
        f"{notes}: INVALID_ARGUMENT: data is not an image: its first bytes match none of the supported "
        "types image/jpeg, image/png, image/webp",
    ]
    assert "content_type" not in " ".join(lines)


def test_client_venv_refuses_an_output_name_that_contradicts_the_format(
    client_venv: Venv, tmp_path: Path
) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg_bytes(skdata.chelsea()))
    # Nothing listens on the target: the refusal comes before any network call.
    for args, words in (
        (["-o", str(tmp_path / "out.bmp")], ".bmp is not a format bgremove writes"),
        (["-o", str(tmp_path / "cut.jpg"), "--format", "png"], "does not match --format png"),
    ):
        out = _remove(client_venv, str(photo), *args, "--target", "127.0.0.1:9")
        assert out.returncode == 2
        (line,) = out.stderr.splitlines()
        assert line.startswith("bgremove remove: error: ") and words in line
