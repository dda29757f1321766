"""The checked-in stubs are exactly what `make protos` generates, and the API passes `buf lint`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATED = ("bgremove_pb2.py", "bgremove_pb2.pyi", "bgremove_pb2_grpc.py")


def test_regenerating_stubs_changes_nothing(tmp_path: Path) -> None:
    from grpc_tools import protoc

    del protoc  # imported to fail early with a clear error when grpcio-tools is missing
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I",
        str(REPO / "protos"),
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        str(REPO / "protos/bgremove/v1/bgremove.proto"),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    makefile = (REPO / "Makefile").read_text()
    assert "--python_out=clients/python --pyi_out=clients/python --grpc_python_out=clients/python" in makefile
    for name in GENERATED:
        fresh = (tmp_path / "bgremove/v1" / name).read_text()
        checked_in = (REPO / "clients/python/bgremove/v1" / name).read_text()
        assert fresh == checked_in, f"clients/python/bgremove/v1/{name} is stale: run `make protos`"


def test_buf_lint_passes() -> None:
    buf = shutil.which("buf") or str(Path(sys.executable).with_name("buf"))
    out = subprocess.run([buf, "lint"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_make_check_protos_fails_when_the_stubs_are_stale(tmp_path: Path) -> None:
    """CI runs `make check-protos`: it passes on the checkout and fails once the proto moves on."""
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    shutil.copytree(REPO / "protos", tmp_path / "protos")
    shutil.copytree(REPO / "clients/python/bgremove/v1", tmp_path / "clients/python/bgremove/v1")
    make = [
        "make",
        "-s",
        "-o",
        ".venv/.installed-stamp",
        "check-protos",
        f"BIN={Path(sys.executable).parent}",
    ]
    fresh = subprocess.run(make, cwd=tmp_path, capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr
    proto = tmp_path / "protos/bgremove/v1/bgremove.proto"
    proto.write_text(proto.read_text().replace("message Limits {", "message Limits {\n  uint32 added = 99;"))
    stale = subprocess.run(make, cwd=tmp_path, capture_output=True, text=True)
    assert stale.returncode != 0
    assert "clients/python/bgremove/v1/bgremove_pb2.py is stale: run make protos" in stale.stderr
