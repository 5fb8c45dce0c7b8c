"""Recipe config: parsing, validation messages, overrides, round trips, shipped recipes, docs."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qtrain.config.recipe import SECTIONS, ConfigError, TrainConfig, _toml_value

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.toml"))


def problems_of(d, overrides=()):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(d, overrides)
    return e.value.problems


# --- defaults, round trips, derived values ------------------------------------------------------------


def test_defaults_and_derived_values():
    cfg = TrainConfig()
    assert (cfg.model.hidden_size, cfg.model.num_heads, cfg.model.kv_heads, cfg.model.head_dim) == (64, 4, 4, 16)
    assert cfg.optim.float_lr_value == 0.01  # float_lr = 0 means "same as lr"
    cfg = TrainConfig.from_dict({"model": {"num_kv_heads": 2}, "optim": {"float_lr": 0.003}})
    assert cfg.model.kv_heads == 2 and cfg.optim.float_lr_value == 0.003


def test_to_dict_and_to_toml_round_trip():
    cfg = TrainConfig.from_dict({"optim": {"args": {"rank": 4, "scale_type": "tensor"}, "float_betas": [0.8, 0.9]},
                                 "train": {"steps": 7}, "data": {"corpus": "a \"quoted\" path.txt"}})
    d = cfg.to_dict()
    assert d["optim"]["float_betas"] == [0.8, 0.9] and d["optim"]["args"] == {"rank": 4, "scale_type": "tensor"}
    assert TrainConfig.from_dict(d) == cfg
    assert TrainConfig.from_dict(tomllib.loads(cfg.to_toml())) == cfg


def test_int_accepted_for_float_and_converted():
    cfg = TrainConfig.from_dict({"optim": {"lr": 1}, "model": {"rope_theta": 500000}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.model.rope_theta == 500000.0 and isinstance(cfg.model.rope_theta, float)


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("QTRAIN_CACHE", str(tmp_path / "env"))
    assert TrainConfig().data.cache_root() == tmp_path / "env"
    cfg = TrainConfig.from_dict({"data": {"cache_dir": str(tmp_path / "explicit")}})
    assert cfg.data.cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("QTRAIN_CACHE")
    assert TrainConfig().data.cache_root() == Path.home() / ".cache" / "qtrain"


def test_config_does_not_import_torch():
    code = "import sys, qtrain.config.recipe; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


# --- validation messages ------------------------------------------------------------------------------


def test_unknown_key_names_section_and_suggestion():
    with pytest.raises(ConfigError, match=re.escape("[train] unknown key 'stpes' (did you mean 'steps'?)")):
        TrainConfig.from_dict({"train": {"stpes": 10}})


def test_unknown_section_suggests():
    with pytest.raises(ConfigError, match=re.escape("unknown section [trian] (did you mean [train]?)")):
        TrainConfig.from_dict({"trian": {"steps": 10}})


def test_unknown_key_without_close_match_lists_valid_keys():
    (msg,) = problems_of({"quant": {"zzz": 1}})
    assert msg == "[quant] unknown key 'zzz'; valid: 'enabled', 'group_size', 'meta_dtype', 'rounding', 'kernels', 'matmul'"


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("train", "steps", "ten", '[train] steps = "ten": expected an integer'),
        ("train", "steps", True, "[train] steps = true: expected an integer"),  # bools are not ints
        ("train", "steps", 10.0, "[train] steps = 10.0: expected an integer"),
        ("optim", "lr", "0.01", '[optim] lr = "0.01": expected a number'),
        ("train", "release", 1, "[train] release = 1: expected true or false"),
        ("data", "corpus", 3, "[data] corpus = 3: expected a string"),
        ("optim", "args", 4, "[optim] args = 4: expected a table"),
        ("optim", "float_betas", [0.9], "[optim] float_betas = [0.9]: expected a list of two numbers"),
    ],
)
def test_wrong_type(section, key, value, message):
    assert problems_of({section: {key: value}}) == [message]


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("train", "steps", 0, "[train] steps = 0: must be >= 1"),
        ("optim", "lr", 0.0, "[optim] lr = 0.0: must be > 0"),
        ("optim", "warmup_frac", 1.0, "[optim] warmup_frac = 1.0: must be >= 0 and < 1"),
        ("optim", "min_lr_ratio", 1.5, "[optim] min_lr_ratio = 1.5: must be >= 0 and <= 1"),
        ("data", "val_fraction", 0.5, "[data] val_fraction = 0.5: must be > 0 and < 0.5"),
        ("optim", "float_betas", [0.9, 1.0], "[optim] float_betas = [0.9, 1.0]: each beta must be in [0, 1)"),
        ("model", "rope_theta", float("inf"), "[model] rope_theta = inf: must be a finite number"),
        ("train", "device", "gpu",
         '[train] device = "gpu": allowed values are "auto", "cpu", "cuda" (did you mean "cpu"?)'),
        ("quant", "meta_dtype", "float16", '[quant] meta_dtype = "float16": allowed values are "float32", "bfloat16"'
                                           ' (did you mean "bfloat16"?)'),
        ("optim", "float_optimizer", "sgd", '[optim] float_optimizer = "sgd": allowed values are "adam8bit", "adamw"'),
    ],
)
def test_out_of_range_or_not_allowed(section, key, value, message):
    assert problems_of({section: {key: value}}) == [message]


def test_release_with_grad_accum_is_rejected():
    msg = ("[train] release = true cannot be combined with grad_accum_steps = 4; "
           "set grad_accum_steps = 1 or release = false")
    with pytest.raises(ConfigError, match=re.escape(msg)):
        TrainConfig.from_dict({"train": {"release": True, "grad_accum_steps": 4}})
    cfg = TrainConfig.from_dict({"train": {"release": False, "grad_accum_steps": 4}})
    assert cfg.train.grad_accum_steps == 4


def test_cross_field_checks():
    assert problems_of({"model": {"num_heads": 5}}) == [
        "[model] num_heads = 5 must divide hidden_size = 64; choose a divisor of 64"]
    assert problems_of({"model": {"hidden_size": 72, "num_heads": 8}}) == [
        "[model] head_dim = hidden_size / num_heads = 72 / 8 = 9 must be even (RoPE rotates pairs of dimensions); "
        "change num_heads"]
    assert problems_of({"model": {"num_kv_heads": 3}}) == [
        "[model] num_kv_heads = 3 must divide num_heads = 4; use a divisor of 4, or 0 for num_kv_heads = num_heads"]
    assert problems_of({"train": {"seq_len": 300}}) == [
        "[train] seq_len = 300 exceeds [model] max_seq_len = 256; lower train.seq_len or raise model.max_seq_len"]
    assert problems_of({"optim": {"method": ""}}) == [
        '[optim] method = "": name an optimizer method, e.g. "apollo" or "apollo_mini"']


def test_all_problems_reported_at_once_and_rejected_keys_skip_cross_checks():
    d = {"train": {"stpes": 1, "seq_len": "long", "grad_accum_steps": 2}, "model": {"num_heads": 0}, "dta": {}}
    problems = problems_of(d)
    assert len(problems) == 5, problems
    # seq_len was rejected, so no "seq_len exceeds max_seq_len" noise; num_heads = 0 fails its range only
    assert problems[0] == "unknown section [dta] (did you mean [data]?)"
    assert "[model] num_heads = 0: must be >= 1" in problems
    assert not any("must divide hidden_size" in p for p in problems)
    with pytest.raises(ConfigError, match=r"^5 problem\(s\) in recipe:\n  - unknown section \[dta\]"):
        TrainConfig.from_dict(d)


def test_from_toml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe file '.*nope.toml' does not exist; the shipped recipes are in"):
        TrainConfig.from_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = \n")
    with pytest.raises(ConfigError, match=r"problem\(s\) in .*bad.toml:\n  - invalid TOML"):
        TrainConfig.from_toml(bad)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[train]\nsteps = "ten"\n')
    with pytest.raises(ConfigError, match=r'1 problem\(s\) in .*wrong.toml:\n  - \[train\] steps = "ten"'):
        TrainConfig.from_toml(wrong)


# --- overrides ----------------------------------------------------------------------------------------


def test_overrides_parse_toml_values_and_bare_strings():
    cfg = TrainConfig().apply_overrides([
        "train.steps=10",
        "optim.args.rank=4",
        "optim.args.scale_type=tensor",  # bare string
        "optim.float_betas=[0.9,0.95]",
        'data.corpus="x.txt"',
        "data.cache_dir=/tmp/q cache",  # not valid TOML: taken as text
        "data.tokenizer=2048",  # a string key keeps the text, not the integer
        " optim.lr = 3e-4 ",
        "train.release=false",
    ])
    assert cfg.train.steps == 10 and cfg.optim.lr == 3e-4 and cfg.train.release is False
    assert cfg.optim.args == {"rank": 4, "scale_type": "tensor"}
    assert cfg.optim.float_betas == (0.9, 0.95)
    assert (cfg.data.corpus, cfg.data.cache_dir, cfg.data.tokenizer) == ("x.txt", "/tmp/q cache", "2048")
    assert TrainConfig().train.steps == 200  # apply_overrides returns a new config


def test_from_toml_with_overrides(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text("[train]\nsteps = 5\n[optim.args]\nrank = 2\n")
    cfg = TrainConfig.from_toml(p, ["train.steps=6", "optim.args.scale=64"])
    assert cfg.train.steps == 6 and cfg.optim.args == {"rank": 2, "scale": 64}


def test_bad_overrides():
    assert problems_of({}, ["steps=10"]) == ["override 'steps=10' must look like section.key=value, e.g. train.steps=10"]
    assert problems_of({}, ["train.steps"]) == [
        "override 'train.steps' must look like section.key=value, e.g. train.steps=10"]
    assert problems_of({}, ["train.stpes=3"]) == ["[train] unknown key 'stpes' (did you mean 'steps'?)"]
    assert problems_of({}, ["train.steps=ten"]) == ['[train] steps = "ten": expected an integer']
    assert problems_of({"train": {"steps": 5}}, ["train.steps.x=1"]) == [
        "override 'train.steps.x=1': train.steps is not a table"]


# --- shipped recipes ----------------------------------------------------------------------------------

EXPECTED_ARCH = {  # hidden, intermediate, heads, layers, vocab (docs/algorithms.md §14)
    "tiny": (64, 176, 4, 2, 2048),
    "60m": (512, 1376, 8, 8, 32000),
    "130m": (768, 2048, 12, 12, 32000),
    "350m": (1024, 2736, 16, 24, 32000),
    "1b": (2048, 5461, 32, 24, 32000),
    "7b": (4096, 11008, 32, 32, 32000),
    "7b-8gb": (4096, 11008, 32, 32, 32000),
    "finetune-tiny": (64, 176, 4, 2, 2048),  # the tiny shape, repeated from the checkpoint it starts from
    "finetune-8b": (4096, 14336, 32, 32, 128256),  # Meta-Llama-3-8B's config.json
}


def test_all_recipes_are_shipped():
    assert sorted(p.stem for p in RECIPES) == sorted(EXPECTED_ARCH)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_with_expected_values(path):
    cfg = TrainConfig.from_toml(path)
    m, o, t = cfg.model, cfg.optim, cfg.train
    assert (m.hidden_size, m.intermediate_size, m.num_heads, m.num_layers, m.vocab_size) == EXPECTED_ARCH[path.stem]
    if path.stem.startswith("finetune"):  # from a Hugging Face checkpoint ([model] init): tests/test_finetune.py
        assert m.init and o.method == "apollo_mini" and o.lr < 0.01 and cfg.quant.enabled and t.release
        return
    assert (o.lr, o.warmup_frac, o.min_lr_ratio, o.weight_decay) == (0.01, 0.1, 0.1, 0.0)
    assert cfg.quant.enabled and cfg.quant.rounding == "stochastic"
    assert t.release and t.grad_accum_steps == 1
    if path.stem == "7b":
        assert o.method == "apollo_mini" and o.float_optimizer == "adam8bit" and o.float_eps == 1e-8
        assert o.args == {"rank": 1, "scale": 128, "scale_type": "tensor", "update_proj_gap": 200,
                          "bias_correction": "inside", "eps": 1e-8}
        assert (t.batch_size, t.seq_len, t.steps, cfg.quant.group_size) == (1, 256, 150000, 128)
    elif path.stem == "7b-8gb":  # the official recipe plus the estimator's memory savings
        assert o.method == "apollo_mini" and o.args["scale"] == 128 and (t.batch_size, t.seq_len) == (1, 256)
        assert (cfg.model.float_dtype, cfg.quant.meta_dtype, t.activation_checkpointing) == ("bfloat16", "bfloat16", True)
        assert o.embedding_optimizer == o.lm_head_optimizer == "same_as_matrices"
    elif path.stem == "tiny":
        assert (t.batch_size, t.seq_len, t.steps, t.eval_every, m.max_seq_len) == (8, 128, 600, 200, 128)
        assert (cfg.quant.group_size, o.method, o.args["scale"], o.float_optimizer) == (64, "apollo_mini", 128, "adamw")
    else:
        rank = {"60m": 128, "130m": 192, "350m": 256, "1b": 256}[path.stem]
        steps = {"60m": 10000, "130m": 20000, "350m": 60000, "1b": 100000}[path.stem]
        assert o.method == "apollo"
        assert o.args == {"rank": rank, "scale": 1, "scale_type": "channel", "update_proj_gap": 200,
                          "bias_correction": "outside", "eps": 1e-6}
        assert (t.batch_size, t.seq_len, t.steps, m.max_seq_len) == (8, 256, steps, 256)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_sets_every_key_with_a_comment(path):
    text = path.read_text()
    raw = tomllib.loads(text)
    for name, cls in SECTIONS.items():
        assert sorted(raw[name]) == sorted(f.name for f in dataclasses.fields(cls)), name
    for line in text.splitlines():
        if re.match(r"^[a-z_]+\s*=", line):
            assert re.search(r"\S\s+# \S", line), f"{path.name}: no trailing comment on {line!r}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_optim_args_accepted_by_registry(path):
    from qtrain.optim.registry import build_method

    cfg = TrainConfig.from_toml(path)
    method = build_method(cfg.optim.method, cfg.optim.args)
    m = cfg.model
    for shape in [(m.hidden_size, m.hidden_size), (m.intermediate_size, m.hidden_size)]:
        method.validate(shape)


# --- docs ---------------------------------------------------------------------------------------------


def test_docs_list_every_key_with_its_default():
    doc = (ROOT / "docs" / "recipes.md").read_text()
    for name, cls in SECTIONS.items():
        body = doc.split(f"## [{name}]\n", 1)[1].split("\n## ", 1)[0]
        rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", body, flags=re.M))
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            assert f.name in rows, f"docs/recipes.md: [{name}] {f.name} is missing"
            assert rows[f.name] == _toml_value(default), f"docs/recipes.md: [{name}] {f.name} default"
