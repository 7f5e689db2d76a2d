#!/usr/bin/env bash
# Sourced by scripts/serve and scripts/test: a .venv in the checkout, created and filled on first use.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -x "$root/.venv/bin/python" ]; then
  python3 -m venv "$root/.venv"
fi
# shellcheck disable=SC1091
. "$root/.venv/bin/activate"
stamp="$root/.venv/.rheads-installed-$EXTRAS"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  EXTRAS="$EXTRAS" "$root/scripts/install.sh"
  touch "$stamp"
fi
