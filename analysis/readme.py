"""Regenerate the numbers of analysis/README.md from the results tables.

    python analysis/readme.py          # rewrite the blocks between <!-- results:NAME --> markers
    python analysis/readme.py --check  # exit 1 if the README differs from what the tables give

Each block is ``section(analysis/results/NAME)`` of ``analysis/NAME.py``; see analysis/common.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- results:(\w+) -->\n)(.*?)(<!-- /results:\2 -->)", re.S)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"analysis_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT))
    return module


def render(text: str) -> str:
    """The README text with every results block regenerated from its script's tables."""
    def block(m):
        body = _script(m.group(2)).section(ROOT / "results" / m.group(2)).strip()
        return f"{m.group(1)}{body}\n{m.group(4)}"

    return BLOCK.sub(block, text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check; exit 1 if the README is stale")
    args = p.parse_args()
    text = README.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print("analysis/README.md is stale: run python analysis/readme.py", file=sys.stderr)
            sys.exit(1)
        return
    README.write_text(new)
    print(README)


if __name__ == "__main__":
    main()
