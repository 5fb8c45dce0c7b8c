"""[model] init: a Hugging Face checkpoint becomes a qtrain model (tiny Llama, Mistral, Qwen2, Qwen3 made here).

What is checked: the int8 model computes the original's function up to the quantization error, which follows
from the group ranges; the int8-free model computes it to fp32 rounding; a sharded checkpoint loads under
(int8 model + one shard) of host memory; the checkpoint's tokenizer and shapes become the run's; the estimator
sizes init runs exactly; every bad input names its fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_hf import TOKENIZER_SIZE, make_checkpoint

from qtrain.config.recipe import ConfigError, TrainConfig
from qtrain.data.finetune import prepare_run_data
from qtrain.data.tokenizer import tokenizer_sha256
from qtrain.errors import DataError, TrainingError
from qtrain.model.builder import build_model, int8_layers
from qtrain.update.build import build_updater

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
FP32_ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per module


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{family: (directory, the fp32 transformers model saved there)}, weights sharded (~50 KB shards)."""
    root = tmp_path_factory.mktemp("ckpt")
    return {f: (root / f, make_checkpoint(root / f, f, seed=i, max_shard_size="50KB")) for i, f in enumerate(FAMILIES)}


def init_cfg(path, *overrides, group_size=64) -> TrainConfig:
    return TrainConfig.from_dict({"model": {"init": str(path)}, "quant": {"group_size": group_size},
                                  "optim": {"float_optimizer": "adamw"}, "train": {"seq_len": 32}}, list(overrides))


def ids(n=2, t=16):
    return torch.randint(0, TOKENIZER_SIZE, (n, t), generator=torch.Generator().manual_seed(0))


# ---- the model computes the checkpoint's function ---------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_int8_init_is_the_original_up_to_the_quantization_error(checkpoints, family):
    """The bound, from the group ranges: nearest rounding moves each weight by at most Δ_g / 2, Δ_g = (max_g -
    min_g) / 255 of its group g. To first order a logit z then moves by at most Σ_w |∂z/∂w| Δ_g(w) / 2 (worst
    case, all errors aligned); with independent errors uniform in ±Δ/2 its typical size is
    σ = sqrt(Σ_w (∂z/∂w)² Δ² / 12). Checked: every weight within Δ/2; qtrain's logits equal the original
    model evaluated with the dequantized weights (so quantization is the only difference); each sampled logit's
    error below the worst-case bound and below 4σ (measured: at most 2.5σ)."""
    path, ref = checkpoints[family]
    cfg = init_cfg(path)
    assert cfg.model.family == family
    model = build_model(cfg.model, cfg.quant, "cpu").eval()
    assert type(model) is type(ref)
    weights = dict(ref.named_parameters())
    half_step = {}
    for name, layer in int8_layers(model).items():
        w = weights[f"{name}.weight"].detach()
        step = layer.scale.repeat_interleave(layer.group_size).reshape(w.shape)
        assert ((layer.dequantize() - w).abs() <= step / 2 + 1e-6 * w.abs().max()).all(), name
        half_step[f"{name}.weight"] = step / 2
    assert len(half_step) == 7 * 2

    x = ids()
    with torch.no_grad():
        got = model(input_ids=x).logits
        substituted = type(ref)(ref.config).eval()
        substituted.load_state_dict({**ref.state_dict(), **{k: int8_layers(model)[k[:-7]].dequantize()
                                                             for k in half_step}})
        torch.testing.assert_close(got, substituted(x).logits, rtol=0, atol=FP32_ATOL)

    z = ref(x).logits
    assert z.abs().max() > 1.0  # informative logits
    for b, t, v in [(0, 3, 5), (1, 15, 100), (0, 15, TOKENIZER_SIZE - 1), (1, 0, 7)]:
        grads = torch.autograd.grad(z[b, t, v], [weights[k] for k in half_step], retain_graph=True)
        worst = sum((g.abs() * half_step[k]).sum() for g, k in zip(grads, half_step)).item()
        sigma = sum(((g * half_step[k]) ** 2).sum() * 4 / 12 for g, k in zip(grads, half_step)).sqrt().item()
        err = (got[b, t, v] - z[b, t, v]).abs().item()
        assert err <= worst and err <= 4 * sigma, (b, t, v, err, worst, sigma)


@pytest.mark.parametrize("family", FAMILIES)
def test_float_init_matches_to_fp32_rounding(checkpoints, family):
    path, ref = checkpoints[family]
    cfg = init_cfg(path, "quant.enabled=false")
    model = build_model(cfg.model, cfg.quant, "cpu").eval()
    assert not int8_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids()).logits, ref(ids()).logits, rtol=0, atol=FP32_ATOL)


def test_architecture_details_survive(checkpoints):
    """GQA, tied embeddings, Qwen2's biases (float, trained by the float optimizer), Qwen3's q/k norms."""
    for family, (path, ref) in checkpoints.items():
        cfg = init_cfg(path)
        model = build_model(cfg.model, cfg.quant, "cpu")
        attn = model.model.layers[0].self_attn
        assert (attn.k_proj.out_features, attn.q_proj.out_features) == (2 * attn.head_dim, 4 * attn.head_dim)  # GQA
        tied = family in ("llama", "qwen2")
        assert cfg.model.tie_embeddings == tied and (model.lm_head.weight is model.model.embed_tokens.weight) == tied
        updater = build_updater(model, cfg)
        biases = sorted(n for n in updater.float_opts if n.endswith("_proj.bias"))
        if family == "qwen2":
            assert biases == [f"model.layers.{i}.self_attn.{p}_proj.bias" for i in (0, 1) for p in "kqv"]
            torch.testing.assert_close(attn.q_proj.bias, ref.model.layers[0].self_attn.q_proj.bias, rtol=0, atol=0)
        else:
            assert biases == []
        norms = {n for n in updater.float_opts if "q_norm" in n or "k_norm" in n}
        assert len(norms) == (4 if family == "qwen3" else 0)
    assert init_cfg(checkpoints["qwen3"][0]).model.head_size == 32  # not 64 / 4


@pytest.mark.parametrize("family", FAMILIES)
def test_config_json_is_read_as_transformers_reads_it(tmp_path, family):
    """qtrain.config.recipe reads config.json with the standard library (checking a recipe never imports torch): the
    keys it fills in, transformers' defaults for omitted keys included, equal transformers' own reading."""
    from transformers import AutoConfig

    from qtrain.config.recipe import checkpoint_model_keys, read_checkpoint_config

    minimal = {"model_type": family, "hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 2,
               "num_attention_heads": 6, "vocab_size": 300}  # everything else omitted, as old checkpoints do
    full = {**minimal, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 4096,
            "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
    for i, raw in enumerate((minimal, full)):
        d = tmp_path / f"{family}{i}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(raw))
        keys, window = checkpoint_model_keys(read_checkpoint_config(str(d)))
        c = AutoConfig.from_pretrained(d)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", None))
        assert keys == {"family": family, "hidden_size": 96, "intermediate_size": 160, "num_layers": 2, "num_heads": 6,
                        "num_kv_heads": c.num_key_value_heads or 6, "head_size": 0 if head_dim == 16 else head_dim,
                        "vocab_size": 300, "max_seq_len": c.max_position_embeddings, "rope_theta": rope,
                        "rms_norm_eps": c.rms_norm_eps, "tie_embeddings": c.tie_word_embeddings}, raw
        assert window == (c.sliding_window if family == "mistral" else None)


# ---- memory while loading -----------------------------------------------------------------------------------
_RSS_PROBE = r"""
import json, sys
import torch
torch.set_num_threads(1)
from qtrain.config.recipe import TrainConfig
from qtrain.model.builder import build_model

def status(key):  # bytes
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

cfg = TrainConfig.from_dict({"model": {"init": sys.argv[1]}, "quant": {"group_size": 128}})
build_model(cfg.model, cfg.quant, "meta")  # imports and lazy set-up happen before the measurement
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS: the peak from here on
model = build_model(cfg.model, cfg.quant, "cpu")
peak = status("VmHWM") - base
tensors = {t.data_ptr(): t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())}
print(json.dumps({"peak": peak, "model": sum(tensors.values())}))
"""


def _write_sharded_bf16_checkpoint(out: Path, shard_bytes: int) -> tuple[list[int], int]:
    """A Llama checkpoint of ~49M parameters in bf16 shards, written straight from random tensors (no model
    in memory); returns (shard sizes in bytes, parameter count)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=2048, max_position_embeddings=256)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    out.mkdir()
    config.save_pretrained(out)
    gen = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for key, shape in shapes.items():
        t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16) if len(shape) == 2 else torch.ones(shape)
        if current and size + t.nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key], size = t, size + t.nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    files = sorted(out.glob("*.safetensors"))
    return [f.stat().st_size for f in files], sum(s.numel() for s in shapes.values())


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_sharded_checkpoint_loads_below_int8_model_plus_one_shard(tmp_path):
    """Peak RSS growth while building the model from a 3-shard bf16 checkpoint (~49M parameters, 98 MB of
    bf16), measured in a fresh process (VmHWM, reset just before the build): below the int8 model's bytes
    (codes, group scales/offsets, fp32 embedding/norms/lm_head) plus the largest shard. Measured: 84-87 MB
    against a bound of 104.1 MB (64.7 + 39.3); the fp32 model alone would be 197 MB. (Each file is mapped for
    one tensor at a time and projections are quantized in row pieces: the growth beyond the model is one
    stored tensor, one piece's fp32 transients and the allocator's slack, ~20 MB here whatever the model.)"""
    shard_sizes, n_params = _write_sharded_bf16_checkpoint(tmp_path / "ckpt", 40 * 10**6)
    assert len(shard_sizes) == 3
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(tmp_path / "ckpt")], env=env, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    bound = got["model"] + max(shard_sizes)
    print(f"\npeak RSS growth {got['peak'] / 1e6:.1f} MB; int8 model {got['model'] / 1e6:.1f} MB + largest shard "
          f"{max(shard_sizes) / 1e6:.1f} MB = {bound / 1e6:.1f} MB; fp32 model {4 * n_params / 1e6:.0f} MB")
    assert got["model"] < 2 * n_params  # an int8 model (fp32 floats included), nowhere near 4 bytes a weight
    assert got["peak"] < bound


# ---- tokenizer and shapes from the checkpoint -----------------------------------------------------------------
def test_checkpoint_tokenizer_vocab_and_token_cache(checkpoints, tmp_path):
    """The run's tokenizer is the checkpoint's (more embedding rows than tokenizer pieces is fine), copied into the
    run directory as is, and the token cache file is keyed by its hash."""
    path, ref = checkpoints["qwen2"]
    corpus = tmp_path / "text.jsonl"  # plain text records: continued pretraining through qtrain.data.dataset
    corpus.write_text("".join(json.dumps({"text": f"Document {i}: the quick brown fox jumps over the lazy dog. " * 20})
                              + "\n" for i in range(40)))
    cfg = init_cfg(path, f"data.corpus={corpus}", f"data.cache_dir={tmp_path / 'cache'}")
    assert cfg.model.vocab_size == ref.config.vocab_size == 416 > TOKENIZER_SIZE
    data = prepare_run_data(cfg, tmp_path / "run")
    assert data.tokenizer.get_piece_size() == TOKENIZER_SIZE and data.tokenizer_path == path
    assert data.tokenizer_sha256 == tokenizer_sha256(path)
    assert data.tokenizer_sha256[:16] in data.token_path.name
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "run" / "tokenizer" / name).read_bytes() == (path / name).read_bytes()
    text = "The lazy dog."
    assert data.tokenizer.decode(data.tokenizer.encode(text)) == text
    x, _ = data.sampler(4, 32, 0).batch_at(0)
    assert int(x.max()) < TOKENIZER_SIZE


# ---- the estimator ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, overrides", [
    ("qwen2", ["train.seq_len=256"]),  # biases, GQA, tied; a longer sequence than any shipped recipe's
    ("qwen3", ["train.seq_len=256"]),  # q/k norms, its own head_dim (32 for hidden 64 / 4 heads)
    ("qwen3", ["train.seq_len=256", "train.dtype=bfloat16", "model.float_dtype=bfloat16"]),
    ("llama", ["train.seq_len=256", "train.activation_checkpointing=true"]),  # GQA, untied
], ids=lambda v: v if isinstance(v, str) else "-".join(o.split(".")[1] for o in v))
def test_estimate_of_an_init_run(tmp_path, family, overrides):
    """Shapes, biases and norms from the checkpoint: persistent bytes exact, the step's peak within 0.2 % of the
    profiler's measurement (the bound docs/estimator.md states for random-init recipes)."""
    from qtrain.core.memory_probe import cpu_peak_bytes
    from qtrain.estimate.memory import estimate
    from qtrain.model.loss import lm_loss
    from qtrain.update.release import attach_release

    untied = {"tie_word_embeddings": False} if family == "llama" else {}  # qwen2 is the tied point
    make_checkpoint(tmp_path / family, family, max_position_embeddings=512, vocab_size=256, **untied)
    cfg = init_cfg(tmp_path / family, "train.batch_size=2", *overrides)
    model = build_model(cfg.model, cfg.quant, "cpu")
    model.train()
    if cfg.train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    updater = build_updater(model, cfg)
    attach_release(updater)
    dtype = {"bfloat16": torch.bfloat16, "auto": torch.float32}[cfg.train.dtype]
    x = torch.randint(0, cfg.model.vocab_size, (2, cfg.train.seq_len), generator=torch.Generator().manual_seed(0))

    def step():
        updater.begin_step(1e-3)
        lm_loss(model, x, x, dtype).backward()
        updater.finish_step()

    step()  # lazy optimizer states exist from here on, as from a run's second step
    tensors = list(model.parameters()) + list(model.buffers()) + [
        t for s in updater.state.values() for t in s.values() if isinstance(t, torch.Tensor)] + [
        t for o in updater.float_opts.values() for s in o.state.values() for t in s.values()
        if isinstance(t, torch.Tensor)]
    persistent = sum({id(t): t.numel() * t.element_size() for t in tensors}.values())
    peak, net = cpu_peak_bytes(step)
    assert net == 0
    b = estimate(cfg, "cpu")
    assert b.persistent_bytes == persistent
    error = b.peak_allocated / (persistent + peak) - 1
    print(f"\n{family} {' '.join(overrides)}: peak {persistent + peak} predicted {b.peak_allocated} ({error:+.3%}), "
          f"{b.peak_phase}")
    assert abs(error) <= 0.002


# ---- bad input ------------------------------------------------------------------------------------------------
def problems(path, *overrides):
    with pytest.raises(ConfigError) as e:
        init_cfg(path, *overrides)
    return e.value.problems


def test_bad_checkpoints_name_the_fix(checkpoints, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert problems(empty) == [f'[model] init = "{empty}": the directory has no config.json, so it is not a '
                               f'Hugging Face model directory; point init at the directory that holds config.json '
                               f'and the *.safetensors weights']

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    [msg] = problems(gpt2)
    assert "model_type 'gpt2' is not supported; qtrain trains llama, mistral, qwen2, qwen3" in msg

    path, _ = checkpoints["llama"]
    assert problems(path, "model.hidden_size=128", "model.num_kv_heads=4") == [
        f"--set model.hidden_size=128 but the checkpoint's config.json ({path}) has 64: leave model.hidden_size "
        f"out (the checkpoint sets it) or set it to 64",
        f"--set model.num_kv_heads=4 but the checkpoint's config.json ({path}) has 2: leave model.num_kv_heads "
        f"out (the checkpoint sets it) or set it to 2"]
    given = TrainConfig.from_dict({"model": {"init": str(path), "hidden_size": 128, "num_kv_heads": 4},
                                   "quant": {"group_size": 64}, "train": {"seq_len": 32}})  # a recipe file's keys
    assert (given.model.hidden_size, given.model.kv_heads) == (64, 2)  # give way to config.json
    assert given.init_replaced == {"hidden_size": (128, 64), "num_kv_heads": (4, 2)}
    same = init_cfg(path, "model.hidden_size=64", "model.num_kv_heads=2", "model.family=llama")  # repeating is fine
    assert TrainConfig.from_dict(same.to_dict()) == same  # a run's recipe.toml (every key written) loads again

    mistral, _ = checkpoints["mistral"]  # sliding_window = 64: causal attention over longer sequences differs
    assert "[train] seq_len = 128 exceeds the checkpoint's sliding_window = 64" in problems(mistral, "train.seq_len=128")[0]

    missing = tmp_path / "nowhere"  # allowed in a recipe (the estimator sizes its keys), refused when built
    cfg = init_cfg(missing)
    with pytest.raises(TrainingError, match=rf'init = "{missing}": no such directory; point it at a local Hugging'):
        build_model(cfg.model, cfg.quant, "cpu")
    with pytest.raises(TrainingError, match="no such directory"):
        prepare_run_data(cfg, None)

    # the group size divides q, o and the MLP (8192 weights each) but not k and v (64 x 64 = 4096)
    qwen3, _ = checkpoints["qwen3"]
    cfg = init_cfg(qwen3, group_size=8192)
    with pytest.raises(ConfigError) as e:
        build_model(cfg.model, cfg.quant, "meta")
    assert e.value.problems == [
        "[quant] group_size = 8192 does not divide model.layers.0.self_attn.k_proj (64 x 64 = 4096 weights), "
        "model.layers.0.self_attn.v_proj (64 x 64 = 4096 weights): every quantized projection's weight count must "
        "be a multiple of the group size; set quant.group_size = 4096 (the largest power of two <= 8192 that "
        "divides all seven) or quant.enabled = false"]


def test_incomplete_checkpoint_files(checkpoints, tmp_path):
    import shutil

    src, _ = checkpoints["qwen2"]
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    (broken / shard).unlink()
    cfg = init_cfg(broken)
    with pytest.raises(TrainingError, match=rf"lists shards that are not there: \['{shard}'\]; finish the download"):
        build_model(cfg.model, cfg.quant, "cpu")
    for f in broken.glob("model*"):
        f.unlink()
    with pytest.raises(TrainingError, match=r"no \*.safetensors weights \(qtrain reads safetensors only"):
        build_model(cfg.model, cfg.quant, "cpu")
    (broken / "tokenizer.json").unlink()
    with pytest.raises(TrainingError, match="holds no tokenizer.json or tokenizer.model"):
        prepare_run_data(cfg, None)
    with pytest.raises(DataError, match=f"has {TOKENIZER_SIZE} pieces but the model's embedding has 256 rows"):
        prepare_run_data(init_cfg(tmp_path / "nowhere", "model.vocab_size=256", f"data.tokenizer={src}"), None)
