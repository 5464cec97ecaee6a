"""The package holds, and can import, the generated code of every .proto
under proto/: a contract that imports a vendored file (buf/validate, ...)
fails here if that file was not generated with it."""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path

import keel_client.proto

# The directory the package was built from (setup.py reads the same variable).
PROTO = Path(os.environ.get("KEEL_PROTO_DIR", Path(__file__).resolve().parents[3] / "proto"))


def generated_modules() -> set[str]:
    return {
        module.name
        for module in pkgutil.walk_packages(keel_client.proto.__path__, prefix="keel_client.proto.")
        if not module.ispkg
    }


def test_every_proto_file_has_its_modules() -> None:
    protos = sorted(path.relative_to(PROTO).with_suffix("").as_posix() for path in PROTO.rglob("*.proto"))
    assert protos, f"no .proto under {PROTO}"
    modules = generated_modules()
    for proto in protos:
        base = "keel_client.proto." + proto.replace("/", ".")
        assert f"{base}_pb2" in modules, f"{proto}.proto was not generated"
        assert f"{base}_pb2_grpc" in modules, f"{proto}.proto has no grpc module"


def test_every_generated_module_imports() -> None:
    modules = sorted(generated_modules())
    assert modules
    for name in modules:
        importlib.import_module(name)


def test_generated_files_register_their_canonical_names() -> None:
    from keel_client.proto.keel.identity.v1 import commands_pb2

    # The descriptor pool knows the contracts by their proto/ paths, whatever
    # Python package they were installed under.
    assert commands_pb2.DESCRIPTOR.name == "keel/identity/v1/commands.proto"
    assert "keel/identity/v1/types.proto" in [d.name for d in commands_pb2.DESCRIPTOR.dependencies]
