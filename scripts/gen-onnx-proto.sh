#!/usr/bin/env bash
# Regenerates exporter/src/onnx_pb.rs (committed) from exporter/proto/onnx.proto,
# which is copied unchanged from the onnx==1.23.2 wheel. protoc comes from PyPI
# grpcio-tools in a throw-away venv; normal builds never need it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install --quiet grpcio-tools==1.85.1
cat > "$tmp/protoc" <<WRAP
#!/usr/bin/env bash
exec "$tmp/venv/bin/python" -m grpc_tools.protoc "\$@"
WRAP
chmod +x "$tmp/protoc"
cd "$root"
PROTOC="$tmp/protoc" cargo run --locked -p geossl-exporter --example gen_onnx_proto
