"""Fine-tune a ViT from a checkpoint, the ViT paper's way: SGD momentum 0.9, no weight decay,
gradient clipping at 1, linear warmup then cosine decay, batch 512, a new zero-initialised head.

Variants after the colon:
  B/16-cifar10   "<model>-<dataset>[-<pixels>]": fine-tune to CIFAR-10 or CIFAR-100 (10k steps,
  S/16-cifar100  lr 0.03, 500 warmup steps; 384 px unless a size is given, e.g. B/16-cifar10-224
  B/16-cifar10-224  for less memory). The weights come from --init_from (a workdir, an orbax
                 checkpoint, a vit_jax .npz, a timm/HF .safetensors); the position embedding is
                 resampled to the new resolution. A GPU job:
                     python train.py --config=configs/finetune.py:B/16-cifar10 \\
                         --workdir=runs/b16-c10 --init_from=ViT-B_16.npz
                 Not run here (no accelerator; no weights are downloaded): the paper reports
                 98.1% (B/16, ImageNet-21k weights) on CIFAR-10 at 384 px. These variants
                 target accelerators (see "Memory" below); the c10-* ones are CPU recipes.
  dinov2_S/14-cifar10-224, dinov2reg_B/14-cifar100-224, deit3_S/16-cifar10-224
                 "<family>_<model>-<dataset>[-<pixels>]": the same recipe from timm's DINOv2,
                 DINOv2-with-registers or DeiT III weights (vit_small_patch14_dinov2,
                 vit_base_patch14_reg4_dinov2, deit3_small_patch16_224, ...), whose model has
                 LayerScale, exact GELU, 4 registers (dinov2reg) and ImageNet input statistics
                 (dinov2_g/14 and dinov2reg_g/14: DINOv2's giant, 1536 wide, 24 heads, SwiGLU):
                     python train.py --config=configs/finetune.py:dinov2_S/14-cifar10-224 \
                         --workdir=runs/dinov2-c10 --init_from=dinov2_s14/model.safetensors
                 Not run here either, nor their memory measured. Family variants take the
                 table below by model and size (clip_B/16-cifar10-224: 4 micro-batches, as
                 B/16 at 224 px); other models and sizes (S/14, B/14, ...) accumulate no
                 gradients, so measure them as below and set --config.grad_accum_steps.
  clip_B/16-cifar10-224, cliplaion_B/16-cifar100-224
                 the same from a CLIP image tower: OpenAI's (timm vit_base_patch16_clip_
                 quickgelu_224.openai, HF openai/clip-vit-base-patch16: pre-norm, quick GELU)
                 or LAION's (vit_base_patch16_clip_224.laion2b: pre-norm, exact GELU), both
                 with CLIP's input statistics and LayerNorm eps 1e-5; the projection head is
                 replaced.
  dinov3_S/16-cifar10-224, dinov3_S+/16-cifar10-256, dinov3_L/16-cifar100
                 the same from DINOv3 (timm vit_*_patch16_dinov3[_qkvb].lvd1689m, HF
                 facebook/dinov3-vit*16-pretrain-lvd1689m): rotary position embeddings and no
                 position embedding (any image size, nothing resampled), 4 registers,
                 LayerScale, no key bias, LayerNorm eps 1e-5, ImageNet statistics; S+ and H+
                 have SwiGLU MLPs (H+: 20 heads). Not run here, nor their memory measured.
  eva02_S/14-cifar10-224, eva02_B/14-cifar100-448
                 the same from EVA-02 (timm eva02_{tiny,small,base,large}_patch14_*: the
                 mim_in22k backbones or their in1k classifiers): RoPE beside the learned position
                 embedding, its coordinates scaled to the 16x16 grid of EVA-02's 224 px
                 pretraining; SwiGLU MLPs 8/3 of the width (B, L: a LayerNorm on their hidden
                 units); the class token in the sequence, GAP then fc_norm; no key bias; CLIP's
                 statistics. Not run here, nor their memory measured.
  siglip_B/16-cifar10-224, siglip_So400m/14-cifar100-224
                 the same from a SigLIP image tower (big_vision's .npz, timm's
                 vit_base_patch16_siglip_224, HF google/siglip-*): no class token, the MAP
                 head, tanh GELU, inputs in [-1, 1].
  c10-0to4       the small source model of the fine-tuning experiment: a 4-block, width-128 ViT
                 with 4x4 patches trained on CIFAR-10 classes 0-4 at 32 px (AdamW, as
                 configs/cifar10.py:short), 600 steps of batch 64:
                     python train.py --config=configs/finetune.py:c10-0to4 --workdir=runs/c10-0to4
  c10-5to9       that model fine-tuned to CIFAR-10 classes 5-9 (new 5-way head), 300 steps of
                 batch 64 with the recipe above (lr 0.01, 30 warmup steps):
                     python train.py --config=configs/finetune.py:c10-5to9 \\
                         --workdir=runs/c10-5to9 --init_from=runs/c10-0to4
                 Measured here (bench/finetune_vs_scratch.py, shared 2-core CPU): test top-1 on
                 classes 5-9 after 300 steps: fine-tuned 65.4%, same recipe from scratch 62.2%,
                 AdamW from scratch 65.4% (65.38%); the source model reached 64.0% on
                 classes 0-4. Fine-tuning: 280 s.

Memory of the <model>-<dataset> variants, which compute in bfloat16 with float32 parameters and
SGD momentum, and accumulate gradients so that batch 512 fits one 80 GB GPU with margin (JAX
takes 75% of it by default, ~60 GiB: XLA_PYTHON_CLIENT_MEM_FRACTION). Per device, from
    python bench/train_memory.py configs/finetune.py:B/16-cifar10 --devices 1
(the trainer's step compiled on abstract inputs: XLA:CPU's buffer assignment, an estimate of a
GPU's and an upper bound for bfloat16 and for flash attention; see that file):
  B/16 at 384 px  grad_accum_steps 16 (micro-batch 32): 36.9 GiB on 1 device (8: 71.4 GiB, too
                  much); on 8 devices 5.9 GiB, or 36.3 GiB with the faster
                  --config.grad_accum_steps=2 (1: 70.2 GiB, too much).
  S/16 at 384 px  8 (micro-batch 64): 36.1 GiB on 1 device; 4.9 GiB on 8 (1: 34.9 GiB).
  B/16 at 224 px  4 (micro-batch 128): 33.3 GiB on 1 device; 5.3 GiB on 8 (1: 16.9 GiB).
Parameters 344 MB (B/16) and 87 MB (S/16), momentum as much. The family variants of these models
and sizes take the same (their parameters differ by less than 1%); other models and sizes
accumulate nothing: measure them the same way and set --config.grad_accum_steps.
"""

import ml_collections

from vit.config_schema import default_config, model_config
from vit.rope import eva02_grid

# (dataset, train split, eval split): evaluated on the test split, as the paper's figures are;
# --config.eval_split='train[98%:]' for big_vision's minival instead.
_DATASETS = {"cifar10": ("cifar10", "train[:98%]", "test"),
             "cifar100": ("cifar100", "train[:98%]", "test")}
_SMALL_MODEL = dict(width=128, depth=4, num_heads=4, mlp_dim=384)
# Backbone families whose weights need more than a plain ViT: their model options (LayerScale's
# initial value is replaced by the loaded scales) and input normalisation.
_FAMILIES = {
    "deit3": (dict(layer_scale=1e-6, gelu_approximate=False), "imagenet"),
    "dinov2": (dict(layer_scale=1e-5, gelu_approximate=False), "imagenet"),
    "dinov2reg": (dict(layer_scale=1e-5, gelu_approximate=False, num_registers=4), "imagenet"),
    # CLIP image towers, LayerNorm eps 1e-5: OpenAI's (quick GELU), LAION's / open_clip's
    "clip": (dict(pre_norm=True, quick_gelu=True, norm_epsilon=1e-5), "clip"),
    "cliplaion": (dict(pre_norm=True, gelu_approximate=False, norm_epsilon=1e-5), "clip"),
    "siglip": (dict(classifier="map"), "minus_one_to_one"),  # no class token, MAP head
    # DINOv3: RoPE and no position embedding, no key bias, LayerNorm eps 1e-5, 4 registers
    "dinov3": (dict(layer_scale=1e-5, gelu_approximate=False, num_registers=4, rope="dinov3",
                    posemb="none", key_bias=False, norm_epsilon=1e-5), "imagenet"),
    # EVA-02: RoPE beside the learned position embedding, scaled to its 224 px pretraining grid;
    # SwiGLU; a class token in the sequence, GAP then fc_norm; no key bias; CLIP's statistics
    "eva02": (dict(rope="eva02", rope_grid=(16, 16), swiglu=True, classifier="gap",
                   class_token=True, fc_norm=True, key_bias=False, gelu_approximate=False),
              "clip"),
}
# EVA-02's MLPs are 8/3 of the width after the gate; B and L normalise their hidden units.
_EVA02_SIZES = {"Ti": dict(mlp_dim=512), "S": dict(mlp_dim=1024),
                "B": dict(mlp_dim=2048, mlp_norm=True), "L": dict(mlp_dim=2730, mlp_norm=True)}
# DINOv3's "plus" models (S+/16, H+/16) have SwiGLU MLPs as wide as the plain ones' (timm's
# vit_small_plus_patch16_dinov3, vit_huge_plus_patch16_dinov3); H+ has 20 heads.
_DINOV3_PLUS = {"S": dict(swiglu=True), "H": dict(num_heads=20, swiglu=True)}
# DINOv2's ViT-g/14 is not big_vision's (1408 wide, 16 heads, GELU): 1536 wide, 24 heads, and
# SwiGLU MLPs of 4096 after the gate (timm's vit_giant_patch14_dinov2, facebook/dinov2-giant).
_DINOV2_GIANT = dict(width=1536, num_heads=24, mlp_dim=4096, swiglu=True)
# Micro-batches per step so that batch 512 fits one 80 GB GPU with margin, from
# bench/train_memory.py (see the module docstring); other models and sizes: 1, measure them.
_GRAD_ACCUM_ONE_80GB = {("B/16", 384): 16, ("S/16", 384): 8, ("B/16", 224): 4}


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The fine-tuning config for `variant` (see the module docstring); "c10-5to9" by default."""
    variant = variant or "c10-5to9"
    if variant == "c10-0to4":
        return _small_cifar10([0, 1, 2, 3, 4], finetune=False)
    if variant == "c10-5to9":
        return _small_cifar10([5, 6, 7, 8, 9], finetune=True)
    model, _, rest = variant.partition("-")
    dataset, _, pixels = rest.partition("-")
    family, _, model = model.rpartition("_")
    if (dataset not in _DATASETS or not (pixels == "" or pixels.isdigit())
            or family not in ("", *_FAMILIES)):
        raise ValueError(
            f"unknown finetune variant {variant!r}: use c10-0to4, c10-5to9 or "
            "[<family>_]<model>-<cifar10|cifar100>[-<pixels>], e.g. B/16-cifar10, "
            f"S/16-cifar100-224 or dinov2_S/14-cifar10-224 (families: {', '.join(_FAMILIES)})")
    size, plus, patch_part = model.partition("+")
    if plus and (family != "dinov3" or size not in _DINOV3_PLUS):
        raise ValueError(f"unknown finetune variant {variant!r}: the '+' models are DINOv3's "
                         f"{', '.join(f'dinov3_{s}+/16' for s in _DINOV3_PLUS)}")
    patch = model.rpartition("/")[2]
    if not pixels and patch.isdigit() and 384 % int(patch):
        raise ValueError(f"finetune variant {variant!r}: the default 384 px is no multiple of "
                         f"{patch}-px patches; give the size, e.g. {variant}-224")
    c = _paper_recipe(size + patch_part, dataset, int(pixels or 384))
    if family:
        options, c.pp.normalize = _FAMILIES[family]
        c.model.update(options)
        if family.startswith("dinov2") and model.startswith("g/"):
            c.model.update(_DINOV2_GIANT)
        if plus:
            c.model.update(_DINOV3_PLUS[size])
        if family == "eva02":
            size = model.partition("/")[0]
            if size not in _EVA02_SIZES:
                raise ValueError(f"unknown finetune variant {variant!r}: EVA-02 comes in "
                                 f"{', '.join(f'eva02_{s}/14' for s in _EVA02_SIZES)}")
            c.model.update(_EVA02_SIZES[size])
            c.model.rope_grid = eva02_grid((int(patch), int(patch)))
    return c


def _sgd_recipe(c: ml_collections.ConfigDict, lr: float, total: int, warmup: int) -> None:
    """The ViT paper's fine-tuning optimiser, in place."""
    c.optimizer = "sgd"
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 0.0
    c.grad_clip_norm = 1.0
    c.schedule = "cosine"
    c.lr = lr
    c.total_steps = total
    c.warmup_steps = warmup
    c.init_keep_head = False  # a new, zero-initialised head for the new classes
    c.init_required = True  # without --init_from this would train from scratch


def _paper_recipe(model: str, dataset: str, image_size: int) -> ml_collections.ConfigDict:
    c = default_config()
    c.dataset, c.train_split, c.eval_split = _DATASETS[dataset]
    c.image_size = image_size
    c.batch_size = 512
    c.eval_batch_size = 512
    c.model = model_config(model, dtype="bfloat16")  # float32 params and optimizer state
    c.grad_accum_steps = _GRAD_ACCUM_ONE_80GB.get((model, image_size), 1)
    c.pp.train_crop = "inception"
    c.pp.inception_area_min = 0.5  # mild: the images are already tight crops
    c.pp.flip = True
    c.pp.normalize = "minus_one_to_one"  # as the public vit_jax / big_vision weights expect
    _sgd_recipe(c, lr=0.03, total=10_000, warmup=500)
    c.eval_every = 1_000
    c.checkpoint_every = 1_000
    c.log_every = 50
    return c


def _small_cifar10(classes: list[int], finetune: bool) -> ml_collections.ConfigDict:
    c = default_config()
    c.dataset = "cifar10"
    c.classes = classes
    c.train_split = "train"
    c.eval_split = "test"
    c.image_size = 32
    c.batch_size = 64
    c.eval_batch_size = 512  # divisible on 1, 2, 4 and 8 devices (tests/test_configs.py)
    c.model = model_config("Ti/4", **_SMALL_MODEL)
    c.pp.train_crop = "resize"  # no crop: too few steps for augmentation to pay off
    c.pp.flip = True
    c.pp.normalize = "cifar10"
    c.log_every = 50
    c.checkpoint_every = 250
    if finetune:
        _sgd_recipe(c, lr=0.01, total=300, warmup=30)
        return c
    c.optimizer = "adamw"
    c.lr = 1e-3
    c.weight_decay = 1e-4  # decoupled (vit/optim.py)
    c.grad_clip_norm = 1.0
    c.schedule = "cosine"
    c.total_steps = 600
    c.warmup_steps = 50
    return c
