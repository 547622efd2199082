# Sourced by tests/run.sh and bench/run.sh: sets $VPY to a Python that has sn_fused's
# dependencies, installing them into .venv on a fresh machine.
#  - SN_FUSED_PYTHON=/path/to/python: use that one as it is (e.g. a GPU machine's image).
#  - otherwise .venv is created (or reused) and the pinned CPU stack installed:
#    torch 2.13.0 (a CPU wheel the CI machine has locally; an unpinned `pip install torch`
#    may pull a multi-GB CUDA build), triton 3.6.0 (what the GPU machines run; its
#    interpreter needs numpy < 2.3), then this project with its extras.
# Either way the C++ read (sn_fused._C, csrc/) is then built in place against that torch (a
# C++ compiler is needed; ~1-1.5 min on 2 cores, once: later runs find it up to date).
# SN_FUSED_BUILD_CPP=0 skips it: layers then read through the Python path.
# tests/run.sh's stage 4 tests the newest stack pip installs here as well (NEWEST_STACK, in
# .venv-newest): torch's own wheel from the package index (with CUDA's libraries, ~5.6 GB; there
# is no CPU build of it there) and the Triton it requires. Both are pinned so that a release
# cannot turn CI red by itself: move them on when the index has newer ones.
PINNED_STACK=("torch==2.13.0" "triton==3.6.0" "numpy<2.3")
NEWEST_STACK=("torch==2.14.1" "triton==3.8.0" "numpy<2.3")

venv_with() {  # venv_with DIR REQUIREMENT...: DIR's python (made if need be), with these installed
  local dir=$1
  shift
  [ -x "$dir/bin/python" ] || "${PYTHON:-python3}" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --disable-pip-version-check "$@"
}

if [ -n "${SN_FUSED_PYTHON:-}" ]; then
  VPY=$SN_FUSED_PYTHON
else
  venv_with .venv "${PINNED_STACK[@]}"
  VPY=.venv/bin/python
  "$VPY" -m pip install -q --disable-pip-version-check -e ".[test,bench]"
fi
if [ "${SN_FUSED_BUILD_CPP:-1}" != "0" ]; then
  build_log=$(mktemp)
  if ! SN_FUSED_BUILD_CPP=1 "$VPY" setup.py -q build_ext --inplace >"$build_log" 2>&1; then
    cat "$build_log"
    echo "error: building sn_fused._C (csrc/) failed; SN_FUSED_BUILD_CPP=0 skips it" >&2
    exit 1
  fi
  rm -f "$build_log"
  export SN_FUSED_REQUIRE_CPP=1  # built: tests/test_cpp_read.py fails if it does not load
fi
"$VPY" - <<'PY'
import torch, triton, numpy
print(f"torch {torch.__version__}  triton {triton.__version__}  numpy {numpy.__version__}  "
      f"cuda available: {torch.cuda.is_available()}")
from sn_fused.ops import spectral_norm as ops
print(f"sn_fused._C (the C++ read): {'built, used' if ops.CPP_READS else 'built, off (SN_FUSED_CPP=0)' if ops._cpp else 'not built'}")
PY
