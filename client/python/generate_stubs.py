#!/usr/bin/env python3
"""Generates the package's gRPC stubs from the repository's protos (proto/) into
mmdit_client/_generated/ (or OUT_DIR/mmdit_client/_generated/ with --out OUT_DIR), with Debian's
protoc and grpc_python_plugin (protobuf-compiler, protobuf-compiler-grpc): the same protoc as the
C++ build, so the generated code matches Debian's python3-protobuf. Debian's python3-grpc-tools
(1.14) is not used: its bundled protoc predates proto3 `optional`, which denoiser.proto uses
("Explicit 'optional' labels are disallowed in the Proto3 syntax").

protoc writes absolute imports ("from mmdit.v1 import denoiser_pb2"); they are rewritten to point
inside the package, so that the stubs never shadow other packages (grpc.health in particular).
"""
import argparse
import pathlib
import re
import shutil
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
PROTOS = ["mmdit/v1/denoiser.proto", "grpc/health/v1/health.proto", "inference/grpc_predict_v2.proto"]
PACKAGE = "mmdit_client._generated"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=HERE, help="directory that holds mmdit_client/")
    parser.add_argument("--protoc", default=shutil.which("protoc") or "protoc")
    parser.add_argument("--plugin", default=shutil.which("grpc_python_plugin") or "grpc_python_plugin")
    args = parser.parse_args()
    out = args.out / "mmdit_client" / "_generated"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    subprocess.run([args.protoc, f"--proto_path={PROTO_ROOT}", f"--python_out={out}", f"--grpc_python_out={out}",
                    f"--plugin=protoc-gen-grpc_python={args.plugin}", *PROTOS], check=True)
    # The packages protoc imports from: "mmdit.v1", "grpc.health.v1", "inference" (never bare "grpc").
    packages = {".".join(proto.split("/")[:-1]) for proto in PROTOS}
    for path in out.rglob("*.py"):
        text = path.read_text()
        for package in packages:
            text = re.sub(rf"^from {re.escape(package)} import", f"from {PACKAGE}.{package} import", text, flags=re.M)
        path.write_text(text)
    for directory in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
