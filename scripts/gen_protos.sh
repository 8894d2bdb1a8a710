#!/usr/bin/env bash
# Regenerate the gRPC stubs protos/generator_pb2.py and protos/generator_pb2_grpc.py from
# protos/generator.proto (run from anywhere; needs grpcio-tools, in the test extras).
# protoc sees the file as raymoe/protos/generator.proto (the -I mapping), so the stubs import each
# other as `raymoe.protos`, the installed package's name; it writes them under raymoe/protos/ of a
# scratch folder, and they are copied beside the .proto. tests/test_protos.py runs this script on a
# copy and fails when the committed stubs differ.
set -euo pipefail
root="${1:-$(cd "$(dirname "$0")/.." && pwd)}"
python="${PYTHON:-python}"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cd "$root"
"$python" -m grpc_tools.protoc -Iraymoe/protos=protos --python_out="$out" --grpc_python_out="$out" \
    raymoe/protos/generator.proto
cp "$out"/raymoe/protos/generator_pb2.py "$out"/raymoe/protos/generator_pb2_grpc.py protos/
