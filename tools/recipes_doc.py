"""Regenerate the key tables of docs/recipes.md from the recipe dataclasses (qtrain.config.recipe_docs).

    python tools/recipes_doc.py          # rewrite docs/recipes.md
    python tools/recipes_doc.py --check  # exit 1 when it is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qtrain.config.recipe_docs import render

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only report whether docs/recipes.md is up to date")
    args = p.parse_args()
    text = DOC.read_text(encoding="utf-8")
    new = render(text)
    if args.check:
        print("docs/recipes.md is up to date" if new == text else "docs/recipes.md is stale: run tools/recipes_doc.py")
        return int(new != text)
    DOC.write_text(new, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
