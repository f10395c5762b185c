# Sourced by scripts/run and scripts/test: a .venv with the project installed for this host.
# Usage: source scripts/_setup.sh [EXTRAS]   (e.g. "test,dev"; always with the "host" extra: every service
# the local runtime runs, and the CLI; each service's own extra is in pyproject.toml)
# Re-running is fast: pip skips what is already satisfied (the llama-cpp-python
# wheel, built once from source, is reused from pip's cache).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv" >&2
  "$PY" -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip wheel
fi
extras="host${1:+,$1}"
spec=".[$extras]"
stamp=.venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-${extras//,/-}
if [ ! -f "$stamp" ]; then
  echo "==> installing the project ($extras) — the first time builds llama-cpp-python (~10 min on 2 cores)" >&2
  .venv/bin/pip install --quiet --disable-pip-version-check -e "$spec"
  touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
