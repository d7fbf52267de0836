"""The keys a run config may hold, their defaults, and the start-up check for unknown keys.

A run config is one flat `ml_collections.ConfigDict` made of three groups, each documented where
it is read: the data keys (`vit.data_options.default_config`, with `pp`), the
optimiser keys (`vit.optim.default_config`) and the trainer keys below. `model` holds the
variant string and any `vit.create_model` overrides, checked when the model is built.
"""

from __future__ import annotations

import difflib
import json
import math
from typing import Any

import ml_collections

from vit import adversarial, data_options, distill, erasing, fewshot, losses, optim, wandb_logger

TTA_MODES = ("none", "flip")  # "flip": mean of the softmax of the image and of its mirror image


def full_token_steps(fraction: float, total_steps: int) -> int:
    """How many of `total_steps` the tail of `fraction` is: rounded half up."""
    return math.floor(fraction * total_steps + 0.5)


# Keys whose default is a value but that also take None (grad_clip_norm=None: no clipping);
# every other key with a non-None default needs a value.
NONE_ALLOWED = frozenset({"grad_clip_norm"})


class ConfigError(ValueError):
    """A config key or value the toolkit does not know."""


def _optional(field_type: type) -> ml_collections.FieldReference:
    return ml_collections.FieldReference(None, field_type=field_type)


def model_config(variant: str = "Ti/16", **overrides: Any) -> ml_collections.ConfigDict:
    """`config.model`: a variant string plus every `vit.create_model` option (None = default)."""
    m = ml_collections.ConfigDict()
    m.variant = variant  # "<size>/<patch>": Ti, S, M, B, L, H, g, G; e.g. "Ti/4", "B/16"
    # or a ResNet hybrid "R<depth>+<size>/<stride>": "R50+B/16", "R26+S/32", "R50+L/32"
    for name in ("width", "depth", "mlp_dim", "num_heads", "patch_size", "representation_size"):
        m[name] = _optional(int)  # None: the variant's value (no pre-logits layer)
    m.classifier = "token"  # "token" | "gap" | "map"
    m.posemb = "learn"  # "learn" | "sincos2d" | "none" (no absolute position: RoPE models)
    m.dropout_rate = 0.0
    m.attention_dropout_rate = 0.0
    m.drop_path_rate = 0.0
    m.head_bias_init = 0.0
    m.dtype = "float32"  # compute dtype, e.g. "bfloat16"; parameters stay float32
    m.matmul_dtype = "float32"  # | "bfloat16": matmul operands, float32 sums (vit/matmul.py)
    m.gelu_approximate = True  # False: exact GELU, for exact parity with timm / HF weights
    m.quick_gelu = False  # True: OpenAI CLIP's x * sigmoid(1.702 x) in the MLP (its weights)
    m.pre_norm = False  # True: a LayerNorm before the first block, as CLIP's image tower
    m.swiglu = False  # True: SwiGLU MLPs (DINOv2-g), the first layer 2 x mlp_dim wide
    m.qk_norm = False  # True: LayerNorm over each head's queries and keys (timm's qk_norm)
    m.rope = "none"  # | "dinov3" | "eva02": rotary embeddings of queries and keys (vit/rope.py)
    m.key_bias = True  # False: no bias in the attention's key projections (DINOv3)
    m.norm_epsilon = 1e-6  # LayerNorm epsilon (CLIP, DINOv3: 1e-5; HF ViT: 1e-12)
    m.rope_grid = _optional(tuple)  # rope="eva02": the grid coordinates are scaled to, (16, 16)
    m.mlp_norm = False  # True: LayerNorm on each MLP's hidden units (EVA-02's sub-LN)
    m.fc_norm = False  # True: the final LayerNorm after GAP pooling (timm's fc_norm; EVA-02)
    m.class_token = False  # True: a class token beside a gap / map head (EVA-02); "token" has one
    m.stem = "patchify"  # | "conv": 3x3 conv stem then a 1x1 projection (vit/stems.py)
    m.stem_channels = _optional(tuple)  # conv stem widths, e.g. (32, 64, 128); None: default
    m.stem_strides = _optional(tuple)  # e.g. (2, 1, 2); None: stride 2 for the last convs
    m.stem_norm = "layernorm"  # | "groupnorm"
    m.resnet_layers = _optional(tuple)  # ResNet hybrid trunk, e.g. (3, 4, 9); None: the variant's
    m.resnet_width = 64  # hybrid trunk's root channels (vit/resnet.py)
    m.resnet_numerics = "vit_jax"  # | "timm": hybrid trunk's epsilons, "timm" for timm weights
    m.token_keep_ratio = 1.0  # PatchDropout: share of patch tokens kept in training; 1 = off
    m.num_registers = 0  # register tokens (Darcet et al. 2024), dropped before the head
    m.layer_scale = _optional(float)  # LayerScale's initial value (CaiT, DeiT III); None: off
    m.attention_impl = "auto"  # | "explicit" | "fused" | "cudnn"; "auto" is decided when the
    # model is built: explicit on CPU, cudnn on a GPU in bfloat16 (vit/attention.py), fused on TPU
    m.matmul_impl = "auto"  # | "xla" | "blas": who computes dense matmuls; "auto" is decided
    # when the model is built: MKL's on an Intel CPU with `vit[mkl]` (bfloat16 operands only
    # with AMX or AVX512_BF16), else XLA's
    m.elementwise_impl = "auto"  # | "xla" | "fused": who computes the LayerNorms and tanh GELU;
    # "auto" is decided when the model is built: the one-pass custom calls on an x86-64 CPU
    # where g++ builds them (vit/elementwise.py), else XLA's
    m.quant = "none"  # | "int8": written by `vit quantize` (vit/quantize.py), not for training
    m.remat = "none"  # | "block" | "dots": recompute encoder activations in the backward pass
    # to save memory (vit/encoder.py REMAT_POLICIES); the same parameters and gradients
    m.update(overrides)
    return m


def trainer_config() -> ml_collections.ConfigDict:
    """The trainer's own keys with their defaults."""
    c = ml_collections.ConfigDict()
    c.model = model_config()
    c.mixup_alpha = 0.0  # Beta(alpha, alpha) mixup; 0 = off
    c.cutmix_alpha = 0.0  # Beta(alpha, alpha) cutmix; 0 = off; both > 0: one of them per batch
    c.label_smoothing = 0.0
    c.random_erase = 0.0  # probability per image of a box of N(0, 1) noise (vit/erasing.py)
    c.loss = losses.DEFAULT  # | "sigmoid_xent": per-class binary cross-entropy (vit/losses.py)
    c.grad_accum_steps = 1  # micro-batches per step (same global batch, less memory)
    c.full_tokens_fraction = 0.0  # the last fraction of total_steps trains with every patch
    # token (FLIP's unmasked tuning after model.token_keep_ratio < 1); 0: keep ratio throughout
    c.log_every = 50  # steps between train-metric writes
    c.eval_every = 0  # steps between evaluations; 0 = only at the end
    c.eval_tta = "none"  # test-time augmentation of the evaluations: "none" | "flip" (2x cost)
    c.eval_images = 4  # eval images whose attention rollout is logged (TensorBoard, W&B) with
    # the confusion matrix at every evaluation (vit/reports.py); 0 = log no images
    c.wandb = wandb_logger.default_config()  # Weights & Biases: enabled, project, entity, ...
    c.checkpoint_every = 500  # steps between checkpoints (also at the end and on SIGTERM)
    c.keep_checkpoints = 3
    c.adv_train = adversarial.default_config()  # adversarial training, vit/adversarial.py
    c.fewshot = fewshot.default_config()  # few-shot probe at each evaluation, vit/fewshot.py
    c.distill = distill.default_config()  # knowledge distillation from a teacher, vit/distill.py
    c.skip_nonfinite = 0  # skip up to N non-finite updates in a row (vit/nonfinite.py); 0: stop
    c.init_from = _optional(str)  # fine-tune from a workdir, orbax checkpoint, .npz, .safetensors
    c.init_required = False  # a fine-tuning config: refuse to start from scratch without init_from
    c.init_keep_head = _optional(bool)  # None: keep the head iff its shape fits
    c.init_keep_pre_logits = True
    c.init_posemb_method = "auto"  # position-embedding resampling: "auto" (vit_jax / big_vision
    # weights "zoom", as their code does; others "bilinear"), or vit.pretrained.RESAMPLE_METHODS
    c.init_resize_patch = False  # FlexiViT PI-resize of the patch kernel to a new patch size
    c.distributed = False  # multi-host: jax.distributed.initialize
    c.coordinator_address = _optional(str)  # host:port; None -> JAX_COORDINATOR_ADDRESS
    c.num_processes = _optional(int)
    c.process_id = _optional(int)
    return c


def default_config() -> ml_collections.ConfigDict:
    """A complete run config with every key at its default; config files start from this."""
    c = data_options.default_config()
    c.update(optim.default_config())
    c.update(trainer_config())
    return c


def _unknown(config: Any, reference: Any, prefix: str = "") -> list[tuple[str, list[str]]]:
    """(dotted key, valid siblings) for every key of `config` that `reference` lacks."""
    found = []
    for key in config:
        name = f"{prefix}{key}"
        if key not in reference:
            found.append((name, sorted(reference)))
        elif isinstance(reference[key], ml_collections.ConfigDict):
            found += _unknown(config[key], reference[key], name + ".")
    return found


def validate_config(config: Any) -> None:
    """Fail at start-up, in one line, on a key the toolkit does not read."""
    unknown = _unknown(config, default_config())
    if unknown:
        name, valid = unknown[0]
        close = difflib.get_close_matches(name.rsplit(".", 1)[-1], valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown config key {name!r}{hint}; valid keys: {', '.join(valid)}")
    missing = [key for key in ("model", "pp") if key not in config]
    if missing:
        raise ConfigError(f"the config has no {missing[0]!r} block: build it from "
                          "vit.config_schema.default_config() (as configs/*.py do)")
    data_options.validate_data_keys(config)  # a DataError (ValueError); pp.eval_resize too
    optim.check_config(config)
    for key in ("mixup_alpha", "cutmix_alpha"):
        if not 0.0 <= float(config[key]) < math.inf:
            raise ConfigError(f"config.{key} must be a finite number >= 0 (0 = off), got "
                              f"{config[key]}")
    try:
        losses.check_loss(config.loss)
        erasing.check_prob(config.random_erase)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not 0.0 <= float(config.full_tokens_fraction) <= 1.0:
        raise ConfigError(f"config.full_tokens_fraction must be in [0, 1] (0 = off), got "
                          f"{config.full_tokens_fraction}")
    if float(config.full_tokens_fraction) > 0:
        if float(config.model.get("token_keep_ratio", 1.0)) >= 1.0:
            raise ConfigError("config.full_tokens_fraction > 0 ends token dropping, which is "
                              "off (model.token_keep_ratio=1): set model.token_keep_ratio < 1, "
                              "or drop full_tokens_fraction")
        if full_token_steps(float(config.full_tokens_fraction), int(config.total_steps)) == 0:
            raise ConfigError(f"config.full_tokens_fraction={config.full_tokens_fraction} of "
                              f"total_steps={config.total_steps} is not one step: raise it, or "
                              "set 0 (off)")
    if not 0.0 <= float(config.label_smoothing) < 1.0:
        raise ConfigError(f"config.label_smoothing must be in [0, 1), got {config.label_smoothing}")
    if "variant" not in config.model:
        raise ConfigError("config.model.variant is missing: set it to e.g. 'Ti/4' or 'S/16'")
    if str(config.model.get("quant", "none")) != "none":
        raise ConfigError(f"config.model.quant={config.model.quant!r} is for inference (`vit "
                          "quantize` writes it): train with quant='none', then quantize the "
                          "trained checkpoint")
    for key in ("log_every", "checkpoint_every", "grad_accum_steps", "keep_checkpoints"):
        if int(config[key]) < 1:
            raise ConfigError(f"config.{key} must be >= 1, got {config[key]}")
    if "adv_train" in config:
        try:
            adversarial.check_config(config.adv_train)
        except adversarial.AttackError as err:
            raise ConfigError(str(err)) from None
    if "distill" in config:
        try:
            distill.check_config(config.distill)
        except distill.DistillError as err:
            raise ConfigError(f"config.distill: {err}") from None
    if "fewshot" in config:
        try:
            fewshot.check_config(config.fewshot)
        except fewshot.FewshotError as err:
            raise ConfigError(f"config.fewshot: {err}") from None
    if config.eval_tta not in TTA_MODES:
        raise ConfigError(f"config.eval_tta={config.eval_tta!r} is unknown; use one of "
                          f"{', '.join(TTA_MODES)}")
    given = [key for key in ("coordinator_address", "num_processes", "process_id")
             if config.get(key) is not None]
    if given and not config.get("distributed"):
        raise ConfigError(f"{', '.join(given)} set, but the run is not multi-host: add "
                          "--multihost (config.distributed=True) to join the other processes, or "
                          "drop them to train alone")
    if int(config.skip_nonfinite) < 0:
        raise ConfigError(f"config.skip_nonfinite must be >= 0 (0 = stop at the first non-finite "
                          f"loss), got {config.skip_nonfinite}")
    if int(config.eval_images) < 0:
        raise ConfigError(f"config.eval_images must be >= 0 (0 = log no images), "
                          f"got {config.eval_images}")
    if int(config.eval_every) < 0:
        raise ConfigError(f"config.eval_every must be >= 0 (0 = only at the end), "
                          f"got {config.eval_every}")


_PER_PROCESS_KEYS = ("distributed", "coordinator_address", "num_processes", "process_id")


def run_fingerprint(config: Any) -> str:
    """The config as canonical JSON without the keys that differ by process (process_id, ...):
    equal on every process of one run."""
    values = {k: v for k, v in config.to_dict().items() if k not in _PER_PROCESS_KEYS}
    return json.dumps(values, sort_keys=True, default=str)
