"""The key tables of docs/recipes.md, generated from the recipe dataclasses: each key documented once.

A key's default and allowed values come from its field (default, `_bounded` bounds, `_choice` values, type), its
effect from the docstring under the field in qtrain/config/recipe.py. docs/recipes.md keeps its hand-written
prose; each table sits between `<!-- keys: SECTION -->` and `<!-- /keys -->`, which `render` rewrites.
`python tools/recipes_doc.py` writes the file; tests/test_docs.py fails when it is stale.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re

from qtrain.config import recipe
from qtrain.config.recipe import SECTIONS

# What a key's field cannot say about its allowed values: constraints between keys (qtrain.config.rules checks
# them), and what a string names.
ALLOWED_NOTES = {
    "model.init": '`""` or a local directory',
    "model.num_heads": "divides `hidden_size`; `hidden_size / num_heads` even",
    "model.num_kv_heads": "0 or a divisor of `num_heads`",
    "model.head_size": "even",
    "model.vocab_size": "must equal the tokenizer's size (with `init`: at least its size)",
    "quant.group_size": "each quantized weight's element count must be a multiple (checked when the model is built)",
    "optim.method": 'a non-empty name, checked by `qtrain/optim/registry.py`: `"apollo"`, `"apollo_mini"`',
    "optim.args": "a table, `[optim.args]`, checked by the method (see below)",
    "train.seq_len": "<= `model.max_seq_len`",
    "train.grad_accum_steps": "must be 1 when `release = true`",
    "data.corpus": '`"default"`, a file, a directory or a glob',
    "data.sources": "a table, `[data.sources]`: source = weight > 0, or source = `{weight, text_field, "
                    "split_blank_lines}`",
    "data.validation": '`""` or a source like `corpus`',
    "data.tokenizer": '`""`, a sentencepiece `.model`, a `tokenizer.json`, or a Hugging Face tokenizer directory',
    "data.cache_dir": 'a path or `""`',
}
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BLOCK = re.compile(r"(<!-- keys: (\w+) -->\n).*?(<!-- /keys -->)", re.S)


def field_docstrings(cls: type) -> dict[str, str]:
    """name -> the docstring under each field of a dataclass, on one line."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    out = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            out[node.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return out


def _allowed(section: str, f: dataclasses.Field) -> str:
    choices, bounds = f.metadata.get("choices"), f.metadata.get("bounds", {})
    note = ALLOWED_NOTES.get(f"{section}.{f.name}")
    if choices:
        base = ", ".join(f"`{recipe._show(c)}`" for c in choices)
    elif set(bounds) == {"ge", "lt"} or set(bounds) == {"ge", "le"} or set(bounds) == {"gt", "lt"}:
        lo, hi = ("[" if "ge" in bounds else "("), ("]" if "le" in bounds else ")")
        base = f"{lo}{recipe._show(bounds.get('ge', bounds.get('gt')))}, {recipe._show(bounds.get('le', bounds.get('lt')))}{hi}"
    elif bounds:
        base = "; ".join(f"{_BOUNDS[k]} {recipe._show(v)}" for k, v in bounds.items())
    elif f.type == "bool":
        base = "true, false"
    elif f.type == "tuple[float, float]":
        base = "two numbers, each in [0, 1)"
    elif note:
        return note
    else:
        base = "a string"
    return f"{base}; {note}" if note else base


def key_table(section: str) -> str:
    """The markdown table of one recipe section: key, default, allowed, effect."""
    cls = SECTIONS[section]
    docs = field_docstrings(cls)
    rows = ["| key | default | allowed | effect |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        rows.append(f"| `{f.name}` | `{recipe._show(recipe._plain(default))}` | {_allowed(section, f)} | "
                    f"{docs[f.name]} |")
    return "\n".join(rows) + "\n"


def render(text: str) -> str:
    """docs/recipes.md with every `<!-- keys: SECTION -->` block regenerated; the rest kept as written."""
    return _BLOCK.sub(lambda m: m.group(1) + key_table(m.group(2)) + m.group(3), text)
