"""docs/recipes.md's key tables are the recipe dataclasses' own documentation, regenerated, never stale."""

from pathlib import Path

from qtrain.config import recipe_docs
from qtrain.config.recipe import SECTIONS

DOC = Path(__file__).resolve().parent.parent / "docs" / "recipes.md"


def test_recipes_md_is_generated_from_the_field_docstrings():
    text = DOC.read_text(encoding="utf-8")
    assert text.count("<!-- keys: ") == len(SECTIONS) == 5
    assert recipe_docs.render(text) == text, "docs/recipes.md is stale: run python tools/recipes_doc.py"


def test_every_key_has_a_row_and_an_edit_shows():
    text = DOC.read_text(encoding="utf-8")
    for section, cls in SECTIONS.items():
        docs = recipe_docs.field_docstrings(cls)
        assert set(docs) == {f for f in cls.__dataclass_fields__}, section  # no key without a docstring
        for key, doc in docs.items():
            assert f"| `{key}` |" in text and doc in text
    stale = text.replace("Optimizer steps. The LR schedule spans exactly this many.", "Optimizer steps.")
    assert recipe_docs.render(stale) == text  # the generator restores the docstring's text
