# Sourced by run_gpu_suite.sh and run_decode_latency.sh (run from the repo root): installs the
# carried wheels in .whl/ (hydra-core, omegaconf, antlr4, mixlora) if present, and puts moelora
# (the repo) and moelora_kernels (kernels/) on PYTHONPATH.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:$PWD/kernels:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
