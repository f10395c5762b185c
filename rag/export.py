"""``python -m rag.export CACHE_DIR [--model PATH] [--int8]``: the embedding model's ONNX export, made once.

What the RAG service does on first start (``rag.onnx_model.cached_export``: one directory per model
fingerprint under ``CACHE_DIR``), as a command of its own, for whoever needs the export without starting
the service or importing ``rag`` (``appliance images build`` bakes it into the RAG image). Prints one JSON
object on stdout: ``{"encoder": PATH, "model": NAME, "exported": bool}`` (``exported``: made by this run,
not found in the cache). Exit 1 with the reason on stderr when the model cannot be exported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rag.export", description=__doc__)
    parser.add_argument("cache_dir", type=Path, help="the export cache (the service's is DATA_DIR/rag/onnx)")
    parser.add_argument("--model", default="", help="a local sentence-transformers model; default: the bundled one")
    parser.add_argument("--int8", action="store_true", help="also the int8-quantised copy (for search queries)")
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is ever downloaded
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from rag.embedder import model_directory
    from rag.onnx_model import ENCODER, OnnxUnavailable, cached_export, fingerprint, read_layout

    path, name = model_directory(args.model)
    try:
        layout = read_layout(path)
        existed = (args.cache_dir / fingerprint(path) / ENCODER).is_file()
        encoder = cached_export(layout, args.cache_dir, int8=args.int8) / ENCODER
    except (OnnxUnavailable, OSError) as exc:
        sys.stderr.write(f"rag.export: {exc}\n")
        return 1
    sys.stdout.write(json.dumps({"encoder": str(encoder.resolve()), "model": name, "exported": not existed}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
