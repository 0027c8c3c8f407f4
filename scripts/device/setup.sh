# Sourced by the device scripts: the carried wheels into /tmp/site, the environment,
# $OUT. The GPU machines have torch but none of the service libraries and no network
# (see README.md here).
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl >/dev/null 2>&1 || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/aegis-out}
