"""Every shipped config loads, validates, builds its model, and the ImageNet recipe trains."""

import importlib
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from vit import config_schema, data, optim, trainer
from vit.model import init_params, model_from_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Every variant of every config file (test_every_config_file_is_listed keeps this complete).
VARIANTS = {
    "smoke": [None],
    "cifar10": ["short", "short-proxy", "ablation-base", "hour", "hour-f32", "hour-conv",
                "Ti/4", "S/4"],
    "imagenet": ["S/16", "B/16", "S/16-300ep", "B/16-300ep"],
    "finetune": ["c10-0to4", "c10-5to9", "B/16-cifar10", "S/16-cifar100", "B/16-cifar10-224",
                 "dinov2reg_S/14-cifar10-224", "clip_B/16-cifar10-224",
                 "dinov3_S+/16-cifar10-224"],
}
CONFIGS = [(name, variant) for name, variants in VARIANTS.items() for variant in variants]
# Recipes for accelerators (bfloat16 compute, float32 parameters and optimizer state) and the
# CPU recipes, tuned in float32 (or float32 with bfloat16 matmul operands) on this machine.
ACCELERATOR = [("imagenet", v) for v in VARIANTS["imagenet"]] + [
    ("finetune", "B/16-cifar10"), ("finetune", "S/16-cifar100"), ("finetune", "B/16-cifar10-224"),
    ("finetune", "dinov2reg_S/14-cifar10-224"), ("finetune", "clip_B/16-cifar10-224"),
    ("finetune", "dinov3_S+/16-cifar10-224"), ("cifar10", "Ti/4"), ("cifar10", "S/4")]
CPU = [c for c in CONFIGS if c not in ACCELERATOR]


def _config(name, variant):
    return importlib.import_module(f"configs.{name}").get_config(variant)


@pytest.mark.parametrize("name,variant", CONFIGS)
def test_config_validates_and_builds_its_model(name, variant):
    config = _config(name, variant)
    config_schema.validate_config(config)
    model = model_from_config(config.model, num_classes=10, image_size=config.image_size)
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    assert shapes["head"]["kernel"].shape[-1] == 10


def test_every_config_file_is_listed():
    assert set(VARIANTS) == {p.stem for p in (ROOT / "configs").glob("*.py")}


@pytest.mark.parametrize("name,variant", CONFIGS)
@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_batch_sizes_split_over_1_2_4_and_8_devices(name, variant, devices):
    config = _config(name, variant)
    for key in ("batch_size", "eval_batch_size"):
        assert config[key] % devices == 0, f"{name}:{variant} {key}={config[key]}"
    per_device = config.batch_size // devices
    assert per_device % config.grad_accum_steps == 0, f"{name}:{variant} grad_accum_steps"


@pytest.mark.parametrize("name,variant", ACCELERATOR)
def test_accelerator_configs_compute_in_bfloat16_with_float32_params_and_optimizer(name, variant):
    config = _config(name, variant)
    assert config.model.dtype == "bfloat16"
    with config.unlocked():  # the same config on a tiny model
        config.model.update(width=32, depth=1, num_heads=2, mlp_dim=64)
    model = model_from_config(config.model, num_classes=10, image_size=config.image_size)
    assert model.dtype == jnp.bfloat16
    # Traced, not run: the dtypes are the trace's (running it compiled a program per config)
    params = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    opt_state = jax.eval_shape(optim.make_optimizer(config, params).init, params)
    floats = [x for x in jax.tree_util.tree_leaves((params, opt_state))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    images = jax.ShapeDtypeStruct((2, config.image_size, config.image_size, 3), jnp.float32)
    logits = jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, images)
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize("name,variant", CPU)
def test_cpu_recipes_keep_float32_compute_and_no_accumulation(name, variant):
    config = _config(name, variant)
    assert config.model.dtype == "float32" and config.grad_accum_steps == 1


def test_single_gpu_fine_tune_at_384_px_accumulates_gradients():
    # bench/train_memory.py: B/16 at 384 px, batch 512 on one 80 GB GPU needs micro-batches of 32
    for variant in ("B/16-cifar10", "B/16-cifar100"):
        config = _config("finetune", variant)
        assert (config.image_size, config.batch_size, config.grad_accum_steps) == (384, 512, 16)
    assert _config("finetune", "L/16-cifar10").grad_accum_steps == 1  # not measured: the default


@pytest.mark.parametrize("name,variant", [("cifar10", "B/99"), ("imagenet", "L/16"),
                                          ("finetune", "B/16-imagenet"), ("smoke", "big")])
def test_unknown_variant_is_a_clear_error(name, variant):
    with pytest.raises(ValueError, match=f"unknown {name} variant"):
        _config(name, variant)


class _InMemoryCheckpointer:
    """Stands in for orbax here: tfds.testing.mock_data also mocks the file system it uses."""

    def __init__(self, workdir, **kwargs):
        self.directory, self.saved = workdir, []

    def latest_step(self):
        return None

    def save(self, step, state, **kwargs):
        self.saved.append(step)

    def wait(self):
        pass

    close = wait


def test_imagenet_recipe(tmp_path, monkeypatch):
    config = _config("imagenet", "S/16")
    assert (config.model.classifier, config.model.posemb) == ("gap", "sincos2d")
    assert config.batch_size == 1024 and config.lr == 1e-3 and config.mixup_alpha == 0.2
    assert (config.pp.randaugment_num_ops, config.pp.randaugment_magnitude) == (2, 10)
    assert config.weight_decay == pytest.approx(1e-4)  # decoupled: not scaled by lr
    assert config.warmup_steps == 10_000 and config.total_steps == 90 * 1_268_355 // 1024
    assert config.model.representation_size == 384  # big_vision's rep_size=True: the width

    # The same recipe, shrunk to seconds, trains on mocked imagenet2012.
    monkeypatch.setattr(trainer.checkpoint, "Checkpointer", _InMemoryCheckpointer)
    with config.unlocked():
        config.model.update(width=32, depth=1, num_heads=2, mlp_dim=64, variant="S/8")
        config.update(image_size=32, batch_size=8, eval_batch_size=8, total_steps=2,
                      warmup_steps=1, shuffle_buffer=16, eval_split="validation[:10]",
                      log_every=1, checkpoint_every=2)
        config.pp.eval_resize = 36
    with tfds.testing.mock_data(num_examples=24):
        assert data.dataset_info(config).num_classes == 1000
        result = trainer.train(config, str(tmp_path))
    assert int(result.state.step) == 2
    assert 0.0 <= result.metrics["eval/top1"] <= 1.0


@pytest.mark.parametrize("family,quick", [("clip", True), ("cliplaion", False)])
def test_clip_families_build_the_model_timms_clip_weights_load_into(tmp_path, family, quick):
    """clip_B/16 (at the fixture's width and depth) takes timm's OpenAI-CLIP weights as they
    are: pre-norm, quick GELU, CLIP's input statistics; cliplaion the same with exact GELU."""
    import safetensors.numpy
    from test_pretrained import fixture, random_weights

    from vit.pretrained import load_pretrained

    config = _config("finetune", f"{family}_B/16-cifar10-224")
    assert config.pp.normalize == "clip" and config.model.pre_norm is True
    assert config.model.quick_gelu is quick
    assert quick or config.model.gelu_approximate is False
    meta, ref = fixture("timm_clip_tiny")
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(random_weights.build(meta["manifest"], meta["seed"]), str(path))
    model = model_from_config({**config.model.to_dict(), "width": 192, "depth": 2, "num_heads": 3,
                               "mlp_dim": 768, "dtype": "float32"},  # the recipe's is bfloat16
                              num_classes=10, image_size=64)
    params, _ = load_pretrained(path, model, init_params(model, jax.random.PRNGKey(0)),
                                keep_head=True)
    if quick:
        x = np.random.RandomState(meta["input_seed"]).standard_normal(
            (meta["batch"], 64, 64, 3)).astype(np.float32)
        np.testing.assert_allclose(np.asarray(model.apply({"params": params}, x)),
                                   ref["logits_quick_gelu"], atol=1e-4, rtol=0)


def test_siglip_family_builds_the_model_timms_siglip_weights_load_into(tmp_path):
    """siglip_B/16 (at the fixture's width and depth, with timm's exact GELU) takes timm's
    SigLIP weights: no class token, the MAP head; So400m/14 is SigLIP's 400M shape."""
    import safetensors.numpy
    from test_pretrained import fixture, random_weights

    from vit.pretrained import load_pretrained

    config = _config("finetune", "siglip_B/16-cifar10-224")
    assert config.pp.normalize == "minus_one_to_one" and config.model.classifier == "map"
    meta, ref = fixture("timm_siglip_tiny")
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(random_weights.build(meta["manifest"], meta["seed"]), str(path))
    model = model_from_config({**config.model.to_dict(), "width": 192, "depth": 2, "num_heads": 3,
                               "mlp_dim": 768, "dtype": "float32", "gelu_approximate": False},
                              num_classes=10, image_size=64)
    params, _ = load_pretrained(path, model, init_params(model, jax.random.PRNGKey(0)),
                                keep_head=True)
    x = np.random.RandomState(meta["input_seed"]).standard_normal(
        (meta["batch"], 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, x)),
                               ref["logits_gelu_erf"], atol=1e-4, rtol=0)
    big = model_from_config(_config("finetune", "siglip_So400m/14-cifar100-224").model.to_dict(),
                            num_classes=100, image_size=224)
    assert (big.width, big.depth, big.mlp_dim, big.num_heads) == (1152, 27, 4304, 16)


@pytest.mark.parametrize("family,registers", [("deit3", 0), ("dinov2", 0), ("dinov2reg", 4)])
def test_backbone_families_build_the_model_their_timm_weights_load_into(tmp_path, family,
                                                                      registers):
    """dinov2reg_S/14 (at the fixture's width and depth) takes timm's DINOv2-reg weights as they
    are; the other families build the same options, without registers."""
    import safetensors.numpy
    from test_pretrained import fixture, random_weights

    from vit.pretrained import load_pretrained

    config = _config("finetune", f"{family}_S/14-cifar100-224")
    assert config.pp.normalize == "imagenet" and config.image_size == 224
    assert config.model.gelu_approximate is False and config.model.layer_scale is not None
    assert config.model.num_registers == registers and config.dataset == "cifar100"
    giant = _config("finetune", f"{family}_g/14-cifar100-224").model
    assert giant.variant == "g/14"  # depth 40 from the variant
    if family == "deit3":
        assert giant.width is None and not giant.swiglu  # the variant's: big_vision's ViT-g
    else:
        assert (giant.width, giant.num_heads, giant.mlp_dim, giant.swiglu) == (
            1536, 24, 4096, True)  # DINOv2's ViT-g
    if family != "dinov2reg":
        return
    meta, _ = fixture("timm_dinov2_reg_tiny")
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(random_weights.build(meta["manifest"], meta["seed"]), str(path))
    model = model_from_config({**config.model.to_dict(), "width": 192, "depth": 2,
                               "num_heads": 3, "mlp_dim": 768}, num_classes=100, image_size=56)
    params, notes = load_pretrained(path, model, init_params(model, jax.random.PRNGKey(0)))
    assert "head initialised: 100 classes (none in the weights)" in notes
    with pytest.raises(ValueError, match="families: deit3, dinov2, dinov2reg, clip, cliplaion, "
                                         "siglip"):
        _config("finetune", "dino_S/14-cifar10")
    with pytest.raises(ValueError, match="384 px is no multiple of 14-px patches; give the size, "
                                         "e.g. dinov2_S/14-cifar10-224"):
        _config("finetune", "dinov2_S/14-cifar10")
