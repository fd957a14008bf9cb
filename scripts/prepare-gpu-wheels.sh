#!/usr/bin/env bash
# Companion of scripts/gpu-check.sh, run on the CPU machine (PyPI reachable): download manylinux
# wheels for CPython 3.12 of what the GPU image lacks (it has torch, transformers, peft, accelerate
# and their dependencies) into shared/wheels/, which travels with the tree to the GPU machine, where
# nothing can be fetched. The whole tree sent must stay under 64 MiB: the wheels get a budget
# (WHEEL_BUDGET_MIB, default 56: the rest of the tree with shared/suite-data is ~6 MiB); bitsandbytes goes last and is left out, with a note in
# shared/wheels/SKIPPED that makes gpu-check.sh skip the bitsandbytes formats, if it does not fit.
#
#   scripts/prepare-gpu-wheels.sh            # then: scripts/gpu-check.sh on the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=shared/wheels
BUDGET_MIB=${WHEEL_BUDGET_MIB:-56}
PIP=${PIP:-/work/main/.venv/bin/pip}
[ -x "$PIP" ] || PIP="python3 -m pip"
PLATFORM_ARGS=(--python-version 3.12 --implementation cp --only-binary=:all: --no-deps
               --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
               --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform any)
# --no-deps and an explicit list: resolving lm-eval's dependencies would pull torch (~800 MB CUDA).
# What lm-eval 0.4.13 imports on the path qeval uses (simple_evaluate, HFLM, loglikelihood /
# generate_until tasks with mean / perplexity metrics), plus datasets' own imports.
CORE=(lm-eval==0.4.13 "datasets>=4,<6" "evaluate==0.4.6" more-itertools
      "dill<0.4.2" "multiprocess<0.70.20" xxhash pytablewriter DataProperty mbstrdecoder pathvalidate
      tabledata tcolorpy typepy chardet "sacrebleu==2.6.0" portalocker tabulate colorama
      "pyarrow>=24" pandas python-dateutil tzdata pytest pluggy iniconfig
      # the CUDA formats of tests/test_gpu_formats.py: torchao (int4 tinygemm; 3.4 MiB, its C++
      # extras are optional), hqq's own dependencies
      torchao==0.18.0 einops termcolor)
PURE_SDIST=(sqlitedict word2number hqq==0.2.8.post1)  # no wheels on PyPI: built here (pure Python, py3-none-any)
OPTIONAL=("bitsandbytes==0.50.2")
rm -rf "$OUT"; mkdir -p "$OUT"
$PIP download -q -d "$OUT" "${PLATFORM_ARGS[@]}" "${CORE[@]}"
$PIP wheel -q --no-deps -w "$OUT" "${PURE_SDIST[@]}"
# Trim what is never loaded: lm-eval's built-in task YAMLs (qeval indexes only its own tasks),
# pyarrow's Flight / S3 / headers / tests (libarrow_substrait is linked by pyarrow.lib: kept;
# checked: pyarrow, datasets, pyarrow.fs/parquet/dataset import on CPython 3.12), pandas' tests.
PY=${PYTHON:-python3}
$PY scripts/trim_wheel.py "$OUT"/lm_eval-*.whl 'lm_eval/tasks/*/*'
$PY scripts/trim_wheel.py "$OUT"/pyarrow-*.whl '*flight*' '*libarrow_s3*' '*_s3fs*' 'pyarrow/include/*' 'pyarrow/src/*' \
    'pyarrow/tests/*' '*.pxd' '*.pyx'
$PY scripts/trim_wheel.py "$OUT"/pandas-*.whl 'pandas/tests/*'
size_mib() { du -sm "$OUT" | cut -f1; }
echo "core wheels: $(size_mib) MiB"
: > "$OUT/SKIPPED"
for pkg in "${OPTIONAL[@]}"; do
  tmp=$(mktemp -d)
  $PIP download -q -d "$tmp" "${PLATFORM_ARGS[@]}" "$pkg"
  # bitsandbytes ships one kernel library per CUDA / ROCm version (42 MiB): keep the CPU one and
  # the one for the GPU image's CUDA (BNB_CUDA, default 130: the image's torch is
  # 2.11.0+cu130; see torch.version.cuda there)
  [[ $pkg == bitsandbytes* ]] && $PY scripts/trim_wheel.py "$tmp"/*.whl 'bitsandbytes/libbitsandbytes_rocm*' \
      'bitsandbytes/libbitsandbytes_xpu*' $(for v in 118 121 124 126 128 130 132; do
        [ "$v" = "${BNB_CUDA:-130}" ] || echo "bitsandbytes/libbitsandbytes_cuda$v.so"; done)
  add=$(du -sm "$tmp" | cut -f1)
  if [ $(( $(size_mib) + add )) -le "$BUDGET_MIB" ]; then
    mv "$tmp"/*.whl "$OUT"/
  else
    echo "$pkg $add MiB (would exceed the ${BUDGET_MIB} MiB wheel budget)" | tee -a "$OUT/SKIPPED"
  fi
  rm -rf "$tmp"
done
ls -la "$OUT"
echo "shared/wheels: $(size_mib) MiB (budget ${BUDGET_MIB} MiB; tree limit 64 MiB)"
# The suite data, built here by `make setup` from the gensim wheel (absent on the GPU image).
QEVAL_PY=${QEVAL_PY:-.venv/bin/python}
rm -rf shared/suite-data
cp -r "$($QEVAL_PY -c 'from qeval.data.suite_data import ensure_built, suite_data_dir; ensure_built(); print(suite_data_dir())')" shared/suite-data
echo "suite data: $(du -sh shared/suite-data | cut -f1) in shared/suite-data"
