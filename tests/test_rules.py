"""qtrain.config.rules: the recipe combinations qtrain trains, decided in one torch-free place, checked before
anything is built; the shapes its FSDP2 rules read from [model] are the shapes build_model makes."""

import subprocess
import sys

import pytest
import torch

from qtrain.config import rules
from qtrain.config.recipe import ConfigError, TrainConfig
from qtrain.config.shipped import find_recipe
from qtrain.model.builder import build_model, float_parameters, int8_layers


@pytest.mark.parametrize("overrides", [
    [],
    ["model.num_kv_heads=2", "model.tie_embeddings=true"],  # GQA, one float matrix
    ["model.family=qwen3", "model.head_size=32"],  # a per-head width of its own
    ["model.family=qwen2", "model.num_kv_heads=1"],  # biases (1-D, not matrices)
])
def test_shapes_from_the_recipe_are_the_built_models(overrides):
    cfg = TrainConfig.from_toml(find_recipe("tiny"), overrides)
    model = build_model(cfg.model, cfg.quant, "meta")
    built = {n: (layer.out_features, layer.in_features) for n, layer in int8_layers(model).items()
             if n.startswith("model.layers.0.")}
    assert rules.projection_shapes(cfg.model) == built
    assert list(rules.projection_shapes(cfg.model)) == list(built)  # same order: the same first offender
    matrices = {n: tuple(p.shape) for n, p in float_parameters(model).items() if p.dim() == 2}
    assert rules.float_matrix_shapes(cfg.model) == matrices


def test_launch_rules_need_where_the_run_happens():
    cfg = TrainConfig.from_toml(find_recipe("7b-8gb"), ["train.cuda_graph=true"])
    assert rules.launch_problems(cfg, 1, "cuda") == []
    assert rules.launch_problems(cfg, 1, None) == []  # device not known yet (prepare): not refused
    assert rules.launch_problems(cfg, 1, "cpu") == []  # off CUDA the same step runs eagerly (the 7B recipes ship it)
    assert rules.launch_problems(cfg, 2, "cuda") == [
        "[train] cuda_graph = true runs in one process, not 2 (its gradient all-reduces are not captured); set "
        "train.cuda_graph = false for data parallel"]
    fsdp = TrainConfig.from_toml(find_recipe("tiny"), ["train.fsdp=true", "optim.float_grad_clip=1.0"])
    assert rules.launch_problems(fsdp, 1, "cpu") == []  # one process: nothing to shard, trains as usual
    assert rules.launch_problems(fsdp, 2, "cpu") == [
        "[optim] float_grad_clip > 0 clips by a tensor's norm, which a shard does not know; set it to 0"]


def test_every_rule_is_a_small_function_of_its_own():
    """The merge-friendly shape: one function per rule, and the lists that run them."""
    assert all(callable(r) and r.__module__ == "qtrain.config.rules" for r in rules.RECIPE_RULES + rules.LAUNCH_RULES)
    assert len(set(rules.RECIPE_RULES)) == len(rules.RECIPE_RULES)


def test_rules_import_no_torch():
    code = "import sys, qtrain.config.rules, qtrain.config.recipe; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.skipif(torch.cuda.is_available(), reason="train.device = auto must resolve to the CPU here")
def test_train_checks_launch_rules_before_preparing_data(tmp_path, monkeypatch):
    """A recipe refused for where it runs is refused before any data is read (the corpus does not even exist):
    here cuda_graph on a world of 2 processes, as torchrun would launch it."""
    import dataclasses

    from qtrain.parallel import distributed
    from qtrain.train.run import train

    monkeypatch.setenv("QTRAIN_CACHE", str(tmp_path / "cache"))
    one = distributed.launched_world()
    monkeypatch.setattr(distributed, "launched_world", lambda: dataclasses.replace(one, size=2))
    monkeypatch.setattr(distributed, "init", lambda *a, **k: pytest.fail("the ranks were joined before the check"))
    cfg = TrainConfig.from_toml(find_recipe("7b-8gb"), ["train.cuda_graph=true", f"data.corpus={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match="cuda_graph = true runs in one process, not 2"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
