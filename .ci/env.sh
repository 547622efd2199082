# Sourced by tests/run.sh and bench/run.sh: sets $VPY to a Python that has sn_fused's
# dependencies, installing them into .venv on a fresh machine.
#  - SN_FUSED_PYTHON=/path/to/python: use that one as it is (e.g. a GPU machine's image).
#  - otherwise .venv is created (or reused) and the pinned CPU stack installed:
#    torch 2.13.0 (a CPU wheel the CI machine has locally; an unpinned `pip install torch`
#    may pull a multi-GB CUDA build), triton 3.6.0 (what the GPU machines run; its
#    interpreter needs numpy < 2.3), then this project with its extras.
if [ -n "${SN_FUSED_PYTHON:-}" ]; then
  VPY=$SN_FUSED_PYTHON
else
  if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
  fi
  VPY=.venv/bin/python
  "$VPY" -m pip install -q --disable-pip-version-check "torch==2.13.0" "triton==3.6.0" "numpy<2.3"
  "$VPY" -m pip install -q --disable-pip-version-check -e ".[test,bench]"
fi
"$VPY" - <<'PY'
import torch, triton, numpy
print(f"torch {torch.__version__}  triton {triton.__version__}  numpy {numpy.__version__}  "
      f"cuda available: {torch.cuda.is_available()}")
PY
