"""The recipes shipped with qtrain (package data qtrain.recipes): find one by name or by path."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from qtrain.config.recipe import ConfigError

DEFAULT_RECIPE = "tiny"


def shipped_recipes() -> dict[str, Path]:
    """name -> file of every shipped recipe (tiny, 60m, ..., 7b-8gb)."""
    root = resources.files("qtrain.recipes")
    return {entry.name.removesuffix(".toml"): Path(str(entry)) for entry in root.iterdir()
            if entry.name.endswith(".toml")}


def find_recipe(name: str | None) -> Path:
    """A recipe file path, or the name of a shipped recipe; None means the default (tiny)."""
    name = name or DEFAULT_RECIPE
    path = Path(name)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    found = shipped.get(name.removesuffix(".toml"))
    if found is None:
        raise ConfigError([f"recipe {name!r} is neither a file nor a shipped recipe; shipped: "
                           f"{', '.join(sorted(shipped))}"], source="command line")
    return found
