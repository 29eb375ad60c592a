#!/usr/bin/env bash
# Mutation testing of the Python code (fod/, fod_kernels/) with mutmut, configured in pyproject.toml
# ([tool.mutmut]). Runs in a temporary copy of the repository (tracked and untracked-not-ignored files plus
# the built extensions), so the working tree never sees a mutant or mutmut's mutants/ folder.
#
#   tools/mutants/run_py_mutants.sh                       # every mutant (hours on 2 cores)
#   tools/mutants/run_py_mutants.sh 'fod.metrics.*'       # mutmut name patterns: a sample
#   KEEP=1 tools/mutants/run_py_mutants.sh ...            # keep the copy (then: cd it; mutmut results / show NAME)
#   TESTS="tests/fod tests/kernels/test_api.py" ...       # only these tests (mutmut runs them once for its stats)
#   WITHOUT="tests/fod/test_fod_pins.py" ...              # delete these test files in the copy (a "before" run)
#   JOBS=2 ...                                            # parallel mutants (default 1: the cores are shared)
#   ONLY="fod/model.py fod/metrics.py" ...                # mutate only these files (mutmut's only_mutate): a
#                                                         # sample is generated much faster than all 19 files
#
# Needs: pip install -e '.[dev]' (or just mutmut). Prints the kill counts and the surviving mutants.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
command -v mutmut >/dev/null || { echo "mutmut is not installed: pip install 'mutmut>=3.8' (or the dev extra)" >&2; exit 2; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fod-py-mutants-XXXXXX")
cleanup() { if [ -z "${KEEP:-}" ]; then rm -rf "$WORK"; else echo "kept $WORK"; fi; }
trap cleanup EXIT
cd "$ROOT"
git ls-files -co --exclude-standard -z | xargs -0 -I{} cp --parents {} "$WORK"/
cp fod_kernels/_C*.so "$WORK"/fod_kernels/ 2>/dev/null || echo "note: no built extensions: the cpu backend's tests will skip or fail" >&2
cd "$WORK"
for f in ${WITHOUT:-}; do rm -f -- "$f"; done
python3 - "${TESTS:-}" "${ONLY:-}" <<'PY'
import json, re, sys
tests, only = sys.argv[1].split(), sys.argv[2].split()
text = open("pyproject.toml").read()
if tests:
    text, n = re.subn(r"(?m)^pytest_add_cli_args_test_selection = .*$",
                      f"pytest_add_cli_args_test_selection = {json.dumps(tests)}", text)
    assert n == 1, "pyproject.toml: no pytest_add_cli_args_test_selection line in [tool.mutmut]"
if only:
    text, n = re.subn(r"(?m)^\[tool\.mutmut\]$", f"[tool.mutmut]\nonly_mutate = {json.dumps(only)}", text)
    assert n == 1, "pyproject.toml: no [tool.mutmut] table"
open("pyproject.toml", "w").write(text)
PY
export HYPOTHESIS_PROFILE=ci TORCH_EXTENSIONS_DIR="$WORK/.torch_extensions"
unset PYTHONPATH
mutmut run --max-children "${JOBS:-1}" "$@" || true
mutmut results --all true > results.txt || mutmut results > results.txt
python3 - <<'PY'
import collections, re
counts = collections.Counter()
for line in open("results.txt"):
    m = re.match(r"\s*(\S+): (.+)$", line)
    if m:
        counts[m.group(2).strip()] += 1
total = sum(counts.values())
killed = counts.get("killed", 0) + counts.get("timeout", 0) + counts.get("segfault", 0)
print(f"mutmut: {total} mutants: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
if total:
    print(f"kill rate {killed}/{total} = {100 * killed / total:.0f}% (killed + timeout + segfault)")
PY
grep -E ": (survived|no tests)" results.txt || true
