#!/usr/bin/env bash
# The README's main command: install raymoe in ./.venv, start a local Ray cluster serving the
# default (demo) model with its experts on Ray actors, ask it a question over gRPC with a streamed
# answer, then shut the cluster down. Run from anywhere; everything stays inside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || python3 -m venv .venv
echo "== installing raymoe into .venv (torch CPU build, ray[serve], grpcio, ...)"
.venv/bin/pip install -q -e .
PORT=${RAYMOE_PORT:-9000}
HTTP_PORT=${RAYMOE_HTTP_PORT:-8000}
echo "== starting the server: raymoe serve --expert-actors 2 --grpc-port $PORT --http-port $HTTP_PORT"
.venv/bin/raymoe serve --expert-actors 2 --grpc-port "$PORT" --http-port "$HTTP_PORT" --no-dashboard \
    > .venv/quickstart-server.log 2>&1 &
SERVER=$!
trap 'echo "== stopping the server"; kill -INT $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
echo "== asking: 123+456=   (raymoe generate --stream; the server log is .venv/quickstart-server.log)"
.venv/bin/raymoe generate --target "127.0.0.1:$PORT" --wait-ready 300 --prompt "123+456=" --max-tokens 8 --stream
echo "== and with the full JSON result:"
.venv/bin/raymoe generate --target "127.0.0.1:$PORT" --prompt "705+38=" --max-tokens 8 --json
echo "== and through the OpenAI-compatible HTTP API:"
BODY='{"prompt": "9+16=", "max_tokens": 8}'
if command -v curl > /dev/null; then
    curl -s "localhost:$HTTP_PORT/v1/completions" -d "$BODY"; echo
else
    .venv/bin/python -c "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], sys.argv[2].encode()).read().decode())" \
        "http://localhost:$HTTP_PORT/v1/completions" "$BODY"
fi
