#!/bin/sh
# Seeds the RAG service's ONNX export cache (data/rag/onnx/<fingerprint>/) with the graph baked into the
# image, so a CPU container never needs torch. Copied under a temporary name and renamed: a container
# killed mid-copy leaves no half-written encoder.onnx where the service would load it.
set -eu
cache="${APPLIANCE_DATA_DIR:-/data}/rag/onnx"
for source in /opt/onnx/*/; do
    [ -f "${source}encoder.onnx" ] || continue
    name=$(basename "$source")
    if [ ! -f "$cache/$name/encoder.onnx" ]; then
        mkdir -p "$cache"
        rm -rf "$cache/.seed-$name" "$cache/$name"
        cp -r "$source" "$cache/.seed-$name"
        mv "$cache/.seed-$name" "$cache/$name"
    fi
done
exec "$@"
