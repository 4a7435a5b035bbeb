#!/usr/bin/env bash
# Apply patches/sglang/*.patch to an installed sglang (idempotent).
#
#   bash patches/sglang/apply.sh              # patch the sglang that `python3` imports
#   bash patches/sglang/apply.sh --check      # report only: exit 0 applied, 1 not yet applied, 2 cannot apply
#   bash patches/sglang/apply.sh --site DIR   # patch the sglang package under DIR (e.g. an unpacked wheel)
#
# PYTHON=/path/to/python picks another interpreter. The patches are written against one release
# (SGLANG_VERSION below); any other installed version is refused rather than half-patched.
set -euo pipefail

SGLANG_VERSION=0.5.23
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
mode=apply
site=""

while [[ $# -gt 0 ]]; do
  case "$1" in
    --check) mode=check; shift ;;
    --site) site="${2:?--site needs a directory}"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "apply.sh: unknown argument '$1' (use --check and/or --site DIR)" >&2; exit 2 ;;
  esac
done

if ! command -v patch >/dev/null; then
  echo "apply.sh: the 'patch' program is missing; install it (e.g. apt-get install patch)" >&2
  exit 2
fi

if [[ -z "$site" ]]; then
  # Locate the package without importing it: importing sglang pulls in CUDA extensions.
  if ! site="$("$python" -c 'import importlib.util, os; s = importlib.util.find_spec("sglang"); print(os.path.dirname(os.path.dirname(s.origin)))' 2>/dev/null)"; then
    echo "apply.sh: sglang is not installed for $python; run: pip install sglang==$SGLANG_VERSION" >&2
    exit 2
  fi
fi
if [[ ! -d "$site/sglang/srt" ]]; then
  echo "apply.sh: no sglang package under $site" >&2
  exit 2
fi

version="$(sed -n 's/^Version: *//p' "$site"/sglang-*.dist-info/METADATA 2>/dev/null | head -n1 || true)"
if [[ "$version" != "$SGLANG_VERSION" ]]; then
  echo "apply.sh: sglang ${version:-of unknown version} under $site; these patches are for $SGLANG_VERSION:" \
       "pip install sglang==$SGLANG_VERSION" >&2
  exit 2
fi

status=0
for p in "$here"/*.patch; do
  name="$(basename "$p")"
  # Already applied when the reverse patch would apply cleanly.
  if patch -p1 -d "$site" -R --dry-run -s -f <"$p" >/dev/null 2>&1; then
    echo "$name: already applied"
    continue
  fi
  if ! patch -p1 -d "$site" --dry-run -s -f <"$p" >/dev/null 2>&1; then
    echo "apply.sh: $name does not apply to sglang $version under $site (files changed locally?);" \
         "reinstall with: pip install --force-reinstall --no-deps sglang==$SGLANG_VERSION" >&2
    exit 2
  fi
  if [[ "$mode" == check ]]; then
    echo "$name: not applied (applies cleanly; run bash patches/sglang/apply.sh)"
    status=1
  else
    patch -p1 -d "$site" -s -f --no-backup-if-mismatch <"$p"
    echo "$name: applied to $site"
  fi
done
exit "$status"
