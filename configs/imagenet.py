"""ViT-S/16 and B/16 on ImageNet-1k with the "Better plain ViT baselines" recipe, for accelerators.

Beyer, Zhai, Kolesnikov (2022): batch 1024, AdamW lr 1e-3, weight decay 1e-4 (decoupled),
10k warmup steps then cosine, RandAugment(2, 10), mixup 0.2, global average pooling head with
a pre-logits layer (Dense + tanh of the model's width: big_vision's rep_size=True), fixed 2-D
sin-cos position embedding, inception crop + flip at 224 px, 90 or 300 epochs of the 99% of the
train split it trains on (the other 1% is big_vision's minival).
Variants: S/16, B/16 (90 epochs), S/16-300ep, B/16-300ep.

    python train.py --config=configs/imagenet.py:S/16 --workdir=runs/in1k-s16 \
        --config.data_dir=/data/tfds --config.manual_dir=/data/imagenet-tars

The paper reports 76.5% (S/16, 90 epochs) and 80.0% (S/16, 300 epochs) top-1 on the validation
set. Not run here (no ImageNet, no accelerator); its code path is tested on mocked imagenet2012.

Targets 8 GPUs or TPU cores: bfloat16 compute (config.model.dtype), float32 parameters and AdamW
state, no gradient accumulation. Memory per device at batch 1024 on 8 devices (128 images each),
the 300-epoch variants alike, from
    python bench/train_memory.py configs/imagenet.py:S/16 --devices 8
(the trainer's step compiled on abstract inputs: XLA:CPU's buffer assignment, an estimate of a
GPU's and an upper bound for bfloat16 and for flash attention; see that file):
    S/16  16.1 GiB  (parameters 88 MB, AdamW moments 176 MB; traced saved activations 11.2 GiB)
    B/16  32.9 GiB  (parameters 346 MB, AdamW moments 691 MB; traced saved activations 22.5 GiB)
"""

import ml_collections

from vit.config_schema import default_config, model_config
from vit.model import VARIANTS

_TRAIN_IMAGES = 1_281_167 * 99 // 100  # train[:99%], the split trained on


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The ImageNet config for `variant`: S/16, B/16, S/16-300ep or B/16-300ep."""
    variant = variant or "S/16"
    arch, _, length = variant.partition("-")
    if arch not in ("S/16", "B/16") or length not in ("", "300ep"):
        raise ValueError(f"unknown imagenet variant {variant!r}: use S/16, B/16, S/16-300ep "
                         "or B/16-300ep")
    epochs = 300 if length else 90
    c = default_config()
    c.dataset = "imagenet2012"
    c.train_split = "train[:99%]"
    c.eval_split = "validation"
    c.image_size = 224
    c.batch_size = 1024
    c.eval_batch_size = 1024
    c.shuffle_buffer = 250_000
    c.pp.train_crop = "inception"
    c.pp.inception_area_min = 0.05
    c.pp.flip = True
    c.pp.randaugment_num_ops = 2
    c.pp.randaugment_magnitude = 10
    c.pp.normalize = "minus_one_to_one"
    c.pp.eval_resize = 256
    c.mixup_alpha = 0.2
    # bfloat16 compute, float32 parameters and optimizer state (vit/model.py)
    c.model = model_config(arch, classifier="gap", posemb="sincos2d", dtype="bfloat16")
    c.model.representation_size = VARIANTS[arch.split("/")[0]]["width"]  # rep_size=True
    c.optimizer = "adamw"
    c.lr = 1e-3
    c.weight_decay = 1e-4  # decoupled, as the paper's (and big_vision's) wd: see vit/optim.py
    c.grad_clip_norm = 1.0
    c.schedule = "cosine"
    c.warmup_steps = 10_000
    c.total_steps = epochs * _TRAIN_IMAGES // c.batch_size
    c.log_every = 100
    c.eval_every = 5_000
    c.checkpoint_every = 2_000
    return c
