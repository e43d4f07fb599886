# Sourced by scripts/*: creates .venv on first use and installs the project into it.
# Re-installs only when pyproject.toml changed since the last install, so repeat runs are fast.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.venv"
python_bin="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    echo "creating $venv" >&2
    "$python_bin" -m venv "$venv"
fi
stamp="$venv/.tonle-installed"
if [ ! -f "$stamp" ] || [ "$repo_root/pyproject.toml" -nt "$stamp" ]; then
    echo "installing tonle and its dependencies into $venv" >&2
    "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
    "$venv/bin/python" -m pip install --quiet -e "$repo_root[dev]" >&2
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
