#!/usr/bin/env bash
# Download into .whl/ the wheels a bare GPU machine (Python 3.12, torch, torchvision, typer,
# rich, numpy, pillow, matplotlib, pyyaml, typing-extensions already installed, no internet)
# lacks to run facecli: pydantic-settings and what it needs. benchmarks/gpu_check.sh installs
# them from there into a private folder. Run here, where pip reaches PyPI; then name .whl in
# the device tool's `carry` (see benchmarks/README.md).
#
# The set, from each wheel's Requires-Dist (extras left out):
#   pydantic-settings -> pydantic, python-dotenv, typing-inspection
#   pydantic          -> annotated-types, pydantic-core (exact pin), typing-extensions, typing-inspection
#   pydantic-core     -> typing-extensions
#   typing-inspection -> typing-extensions
# typing-extensions is on the machine but of unknown version, and pydantic needs a recent one,
# so it travels too (a few hundred KB). Everything else facecli needs (pyproject.toml: torch,
# torchvision, typer, rich, numpy, pillow, matplotlib, pyyaml for --config files) must be on the
# image: the script below lists which, and gpu_check's environment row says, package by package,
# which version the machine has or "missing". wandb is optional (tracking off without it).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
dest=.whl
WHEELS=(
    "pydantic==2.14.4"
    "pydantic-core==2.50.5"      # the exact version pydantic 2.14.4 pins
    "pydantic-settings==2.16.3"
    "python-dotenv==1.2.4"
    "annotated-types==0.8.0"
    "typing-inspection==0.4.5"
    "typing-extensions==4.16.0"
)
mkdir -p "$dest"
rm -f "$dest"/*.whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$dest" "${WHEELS[@]}"
# Say what each wheel asks for, so a version bump that adds a dependency is seen here.
"$py" - "$dest" <<'PY'
import sys, zipfile, pathlib
have = set()
needs = {}
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = whl.name.split("-")[0].lower().replace("_", "-")
    have.add(name)
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        reqs = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines() if l.startswith("Requires-Dist:")]
    needs[name] = [r for r in reqs if "extra ==" not in r]
    print(f"{whl.name}: requires {', '.join(needs[name]) or 'nothing'}")
import re, tomllib
on_machine = {"typer", "rich", "numpy", "pillow", "matplotlib", "pyyaml", "torch", "torchvision"}
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
facecli_needs = {re.split(r"[ ;<>=!~\[(]", r, 1)[0].lower() for r in project["dependencies"]} - {"wandb"}
print("facecli needs, from the image:", ", ".join(sorted(facecli_needs - have)))
unplanned = sorted(facecli_needs - have - on_machine)
if unplanned:
    print("neither fetched here nor expected on the image:", ", ".join(unplanned))
    sys.exit(1)
missing = sorted({re.split(r"[ ;<>=!~\[(]", r, 1)[0].lower().replace("_", "-") for rs in needs.values() for r in rs} - have - on_machine)
print("missing:", ", ".join(missing) if missing else "nothing")
sys.exit(1 if missing else 0)
PY
du -sh "$dest"
