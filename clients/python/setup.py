"""Generates keel_client.proto from the repository's proto/ while building.

Every .proto file under proto/ is compiled (the directory is walked, so a
contract added or vendored there, such as buf/validate, is generated without
touching this file) with grpcio-tools' protoc into the build directory:
messages (`--python_out`), their type stubs and the typed service stubs
(mypy-protobuf's `--mypy_out` and `--mypy_grpc_out`) and the grpcio stubs
(`--grpc_python_out`).

protoc writes absolute imports named after the proto packages
(`from keel.identity.v1 import types_pb2`, `from grpc.health.v1 import ...`).
Installed as they are, they would be top-level packages `keel`, `buf`,
`google.api` and `grpc.health` - the last one inside grpcio's own `grpc`
package, and `google.api`/`google.rpc` on top of googleapis-common-protos.
So the generated tree lives under `keel_client.proto` and its imports of
generated modules are rewritten to that prefix; the proto file names in the
descriptor pool stay the canonical ones.

KEEL_PROTO_DIR overrides where proto/ is (default: ../../proto from here).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PACKAGE = "keel_client.proto"


def proto_root() -> Path:
    root = Path(os.environ.get("KEEL_PROTO_DIR", HERE / ".." / ".." / "proto")).resolve()
    if not root.is_dir():
        raise SystemExit(f"keel-client: proto directory {root} not found (set KEEL_PROTO_DIR)")
    return root


def proto_files(root: Path) -> list[str]:
    files = sorted(path.relative_to(root).as_posix() for path in root.rglob("*.proto"))
    if not files:
        raise SystemExit(f"keel-client: no .proto file under {root}")
    return files


def generate(root: Path, out: Path) -> None:
    from grpc_tools import protoc  # a build requirement (pyproject.toml)

    # protoc runs plugins as executables: mypy-protobuf's are console scripts
    # of the build environment.
    plugins = []
    for name in ("protoc-gen-mypy", "protoc-gen-mypy_grpc"):
        found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
        if found is None:
            raise SystemExit(f"keel-client: {name} not found (mypy-protobuf is a build requirement)")
        plugins.append(f"--plugin={name}={found}")

    files = proto_files(root)
    # The well-known types (google/protobuf) come from grpcio-tools, as the
    # protobuf runtime ships their generated code.
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={root}",
        f"--proto_path={well_known}",
        *plugins,
        f"--python_out={out}",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        *files,
    ]
    status = protoc.main(args)
    if status != 0:
        raise SystemExit(f"keel-client: protoc failed with status {status}")

    # Every directory a generated module sits in is a package of ours.
    packages = {Path(f).parent.as_posix().replace("/", ".") for f in files}
    for package in packages:
        parts = package.split(".")
        for depth in range(1, len(parts) + 1):
            init = out.joinpath(*parts[:depth], "__init__.py")
            if not init.exists():
                init.write_text("")
    rewrite_imports(out, packages)


def rewrite_imports(out: Path, packages: set[str]) -> None:
    # Only `from <package> import <module>` lines of the generated packages:
    # the serialized descriptors in *_pb2.py also spell package names and must
    # stay byte for byte as protoc wrote them.
    alternatives = "|".join(re.escape(p) for p in sorted(packages, key=len, reverse=True))
    pattern = re.compile(rf"^from ({alternatives}) import ", re.MULTILINE)
    for path in out.rglob("*"):
        if path.suffix in (".py", ".pyi") and path.name != "__init__.py":
            text = path.read_text()
            rewritten = pattern.sub(rf"from {PACKAGE}.\1 import ", text)
            if rewritten != text:
                path.write_text(rewritten)


class BuildWithGeneratedCode(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib, *PACKAGE.split("."))
        if target.exists():
            shutil.rmtree(target)
        generate(proto_root(), target)
        (target / "__init__.py").write_text('"""Generated from proto/ at build time."""\n')


setup(cmdclass={"build_py": BuildWithGeneratedCode})
