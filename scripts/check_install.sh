#!/usr/bin/env bash
# Install as a Colab or Jupyter user does, from the wheel and from the sdist, each into a fresh venv
# with the notebook extra, and use it there: `backprop-ninja check`, a notebook graded in a kernel,
# `from backprop_ninja import cmp` in a kernel; then the sdist once more without a C compiler.
# Slow (two venvs, torch twice): run by hand before a release, not by `make test`.
#     bash scripts/check_install.sh            (BACKPROP_NINJA_DATA must point at a folder with names.txt)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
: "${BACKPROP_NINJA_DATA:?set BACKPROP_NINJA_DATA to the folder that holds names.txt}"
python3 -m venv "$work/build" && "$work/build/bin/pip" install -q build
"$work/build/bin/python" -m build -q --wheel --sdist -o "$work/dist" "$repo"
cd "$work"

use() {  # $1: venv; grade the lecture network, a notebook, and cmp in a kernel
    "$1/bin/backprop-ninja" check > /dev/null
    PYTHONPATH="$repo/tests" "$1/bin/python" -c "
from pathlib import Path
import notebook_fixtures as f
f.write(Path('correct.ipynb'), f.correct())"
    "$1/bin/backprop-ninja" check --notebook correct.ipynb | tail -1
    "$1/bin/python" - <<'PY'
import nbformat
from nbclient import NotebookClient
cell = ("import torch\nfrom backprop_ninja import cmp\nt = torch.ones(3, requires_grad=True)\n"
        "(2 * t).sum().backward()\ncmp('t', 2 * torch.ones(3), t)")
nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell)])
NotebookClient(nb, kernel_name="python3", timeout=120).execute()
out = "".join(o.get("text", "") for o in nb.cells[0].outputs)
assert "exact: True" in out, out
print("cmp in a kernel:", out.strip())
PY
}

for kind in whl tar.gz; do
    python3 -m venv "venv-$kind"
    "venv-$kind/bin/pip" install -q "${TORCH_SPEC:-torch==2.13.0}"
    "venv-$kind/bin/pip" install -q "$(ls dist/*."$kind")[notebook]"
    echo "== from the $kind"
    use "venv-$kind"
done
echo "== the sdist without a C compiler"
CC=/bin/false "venv-tar.gz/bin/pip" install -q --force-reinstall --no-deps "$(ls dist/*.tar.gz)"
"venv-tar.gz/bin/python" -c "from backprop_ninja.training import kernel; assert not kernel.kernel_available()"
"venv-tar.gz/bin/backprop-ninja" check > /dev/null && echo "installed without the C step; check runs"
