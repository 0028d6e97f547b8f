#!/usr/bin/env bash
# Mutation testing of Portway's sans-I/O core:  bash scripts/mutate.sh [MODULE...]
#
# mutmut (the `mutation` extra in pyproject.toml) makes small changes ("mutants") to src/portway/proto/ one
# at a time and runs the fast unit tests of tests/proto against each; a mutant no test notices "survived".
# Settings are [tool.mutmut] in pyproject.toml. A developer's tool, not part of CI: every module of proto/
# takes about 17 minutes on 2 cores (1,796 mutants); name modules to run fewer, e.g.  bash scripts/mutate.sh frame mux
#
# It starts from a clean mutants/ (git-ignored), prints mutmut's summary, then the surviving mutants and
# a count per module. Look at one with  mutmut show NAME  (or all with  mutmut browse). Survivors in error
# messages and log text may stay; a survivor in what the code decides needs a test.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! python3 -c "import mutmut" 2>/dev/null; then
    # the `mutation` extra, without reinstalling portway itself
    mapfile -t requirements < <(python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['mutation']))")
    echo "mutate.sh: installing ${requirements[*]}" >&2
    python3 -m pip install --quiet "${requirements[@]}"
fi

patterns=()
for module in "$@"; do
    module="${module%.py}"
    if [ ! -f "src/portway/proto/$module.py" ]; then
        echo "mutate.sh: no module src/portway/proto/$module.py" >&2
        exit 2
    fi
    patterns+=("portway.proto.$module.*")
done

rm -rf mutants && mkdir mutants
# mutmut puts mutants/src first on sys.path itself; a PYTHONPATH naming this checkout's src/ would not matter,
# but one naming another checkout would hide the mutants
env -u PYTHONPATH python3 -m mutmut run --max-children "$(nproc)" "${patterns[@]}" >mutants/run.log 2>&1 || {
    status=$?
    tail -n 40 mutants/run.log >&2
    exit "$status"
}
grep -a -o -E '[0-9]+/[0-9]+ +🎉.*' mutants/run.log | tail -n 1 || true
grep -a -E 'mutations/second' mutants/run.log || true

python3 - <<'EOF'
import json
import pathlib
from collections import Counter

KILLED = {1, 3}
rows = []
survivors = []
for meta in sorted(pathlib.Path("mutants/src/portway/proto").glob("*.py.meta")):
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    checked = {name: code for name, code in codes.items() if code is not None}
    if not checked:
        continue
    tally = Counter("killed" if code in KILLED else "survived" if code == 0 else "no tests" if code in (5, 33)
                    else "timeout" if code in (24, -24, 36, 152, 255) else f"exit {code}" for code in checked.values())
    rows.append((meta.name.removesuffix(".py.meta"), len(checked), tally))
    survivors += sorted(name for name, code in checked.items() if code == 0)
print("\nsurviving mutants (mutmut show NAME):")
for name in survivors:
    print("  " + name)
print(f"\n{'module':<10} {'mutants':>8} {'killed':>7} {'survived':>9} {'no tests':>9} {'other':>6}")
for module, total, tally in rows:
    other = total - tally["killed"] - tally["survived"] - tally["no tests"]
    print(f"{module:<10} {total:>8} {tally['killed']:>7} {tally['survived']:>9} {tally['no tests']:>9} {other:>6}")
EOF
