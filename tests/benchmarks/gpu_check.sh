#!/usr/bin/env bash
# The prepared GPU check (docs/gpu.md): run from the repository root of a copy of the tree on a GPU host with no
# network, e.g. through the device tool: run(command="bash tests/benchmarks/gpu_check.sh", carry=[".whl"],
# timeout_s=540). Installs carried wheels (.whl/*.whl, e.g. bitsandbytes) and the package without dependencies,
# then runs tests/benchmarks/gpu_check.py (pytest -m gpu, then the checks) with a hard stop at 8 minutes; every
# output lands in $OUT (default ./gpu_check): gpu_check.json, gpu_check.txt, gpu_tests.xml, gpu_tests.log,
# gpu_check.log, install.log. Extra arguments go to gpu_check.py (e.g. --only quantized).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
# the library imports as bridgeprobe.probes/.prompts/.analyses (pyproject's package-dir); should the editable install
# below fail (an old setuptools without network), a namespace of links to the folders stands in for it
ns=$(mktemp -d)/site && mkdir -p "$ns/bridgeprobe" && for pkg in probes prompts analyses; do ln -s "$PWD/$pkg" "$ns/bridgeprobe/$pkg"; done
export OUT HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$ns:$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
{
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  # the console script (tests/test_distributed.py runs it); without network, so no build isolation
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . || echo "pip install -e . failed: the namespace below is used"
  nvidia-smi
  "$PY" -m pip list 2>/dev/null | grep -i -E '^(torch|transformers|accelerate|peft|bitsandbytes|pytest|tokenizers) '
} >"$OUT/install.log" 2>&1
timeout -k 10 480 "$PY" tests/benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
