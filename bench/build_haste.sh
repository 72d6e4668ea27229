#!/usr/bin/env bash
# Builds Haste's PyTorch wheel (haste_pytorch, the bench's peer for LSTM, LayerNormLSTM, GRU and
# LayerNormGRU) for the project's GPU machine, on a machine without a GPU, into .whl/, where
# bench/gpu_session.sh installs what a run carries (`carry: [".whl"]`):
#
#   bash bench/build_haste.sh HASTE_SOURCE PYTHON
#
# HASTE_SOURCE: a checkout of github.com/lmnt-com/haste (built and checked at ceba32e, its last
# commit); PYTHON: an interpreter that matches the GPU machine's, Python 3.12 with torch 2.11.0 built
# for CUDA 13.0 (PyPI's: `python3.12 -m venv V && V/bin/pip install torch==2.11.0 setuptools
# wheel ninja`), since an extension runs only beside the torch it was compiled against; nvcc 13.0
# on the PATH (CUDA_HOME taken from it). Haste is not on the package index, and the GPU machine has
# no network; building there would spend its device time.
#
# What differs from Haste's own Makefile and setup: code for sm_90 alone (its Makefile asks for
# compute_37, which CUDA 13 no longer has), C++17 (what torch's and CUDA 13's headers need),
# cuBLAS's headers from the pip package that torch depends on (the toolkit here has none), and
# the shared object linked stripped (38 MB of debug information otherwise). Haste's sources are
# compiled as they are.
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: bash bench/build_haste.sh HASTE_SOURCE PYTHON" >&2
    exit 2
fi
source_dir=$(cd "$1" && pwd)
# absolute, as the build runs in a scratch folder (a relative V/bin/python would name nothing there);
# the venv's own bin folder kept, not the interpreter it links to, so that its packages come along
python=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")
out_dir=$(pwd)/.whl
[ -f "$source_dir/lib/haste.h" ] || { echo "HASTE_SOURCE: $source_dir holds no lib/haste.h" >&2; exit 2; }
nvcc_path=$(command -v nvcc) || { echo "nvcc is not on the PATH" >&2; exit 2; }
"$python" - <<'EOF' || exit 2
import sys, torch
if sys.version_info[:2] != (3, 12) or not torch.__version__.startswith("2.11.0") or torch.version.cuda != "13.0":
    sys.exit(f"PYTHON: the GPU machine has Python 3.12 with torch 2.11.0 for CUDA 13.0; this one is Python "
             f"{sys.version.split()[0]} with torch {torch.__version__} for CUDA {torch.version.cuda}")
EOF
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")}
cuda_headers=$("$python" -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13', 'include'))")
[ -f "$cuda_headers/cublas_v2.h" ] || { echo "no cublas_v2.h under $cuda_headers" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$source_dir/." "$work"
cd "$work"
rm -rf dist  # a wheel the source folder may hold from an earlier build
git rev-parse HEAD 2>/dev/null | sed 's/^/haste commit: /' || true
make haste NVCC="nvcc -ccbin ${CXX:-g++}" GPU_ARCH_FLAGS="-gencode arch=compute_90,code=sm_90" \
    NVCC_FLAGS="-std=c++17 -x cu -Xcompiler -fPIC" LOCAL_CFLAGS="-I$cuda_headers -Ilib -O3" >/dev/null
echo '__version__ = "0.5.0rc0"' >frameworks/pytorch/_version.py
cat >setup_sm90.py <<EOF
import os
from glob import glob

from setuptools import setup
from torch.utils import cpp_extension

extension = cpp_extension.CUDAExtension(
    "haste_pytorch_lib", sources=sorted(glob("frameworks/pytorch/*.cc")),
    include_dirs=[os.path.abspath("lib"), "$cuda_headers"], libraries=["haste"], library_dirs=["."],
    extra_compile_args={"cxx": ["-std=c++17", "-Wno-sign-compare"], "nvcc": []}, extra_link_args=["-s"])
setup(name="haste_pytorch", version="0.5.0rc0+sm90", packages=["haste_pytorch"],
      package_dir={"haste_pytorch": "frameworks/pytorch"}, ext_modules=[extension],
      cmdclass={"build_ext": cpp_extension.BuildExtension})
EOF
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-2} "$python" setup_sm90.py -q bdist_wheel >build.log 2>&1 \
    || { grep -m 30 -E "error|Error" build.log >&2 || tail -n 20 build.log >&2; exit 1; }
mkdir -p "$out_dir"
rm -f "$out_dir"/haste_pytorch-*.whl
cp dist/haste_pytorch-*.whl "$out_dir"/
# the wheel must import beside that torch (a CPU is enough: it loads the CUDA libraries, runs nothing)
"$python" -m pip install -q --no-deps --target "$work/site" "$out_dir"/haste_pytorch-*.whl
PYTHONPATH="$work/site" "$python" -c "import haste_pytorch; print('built', haste_pytorch.__file__)"
ls -l "$out_dir"/haste_pytorch-*.whl
