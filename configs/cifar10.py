"""ViT from scratch on CIFAR-10 (the shipped copy in ../shared/data/tfds).

Variants after the colon. Figures: the whole command from a fresh clone on a 2-core
development machine, CPU only, test top-1 / top-5 on all 10,000 test images with flip TTA; the
machine is named as `lscpu` names it ("Intel Xeon": "Intel(R) Xeon(R) Processor", family 6,
AVX-512 and AMX; "AMD EPYC": family 25, AVX2 and AVX-512).
  short       `make train`: the time-to-accuracy recipe cut to ~7 minutes of training.
                  python train.py --config=configs/cifar10.py:short --workdir=runs/cifar10-short
              Plain patchify stem, float32, 3,600 steps keeping half the patch tokens, no crop.
              Measured (`make train` from a fresh clone, Intel Xeon): 65.3% top-1, 97.2% top-5
              in 6.8 minutes, setup included (the conv stem's 2,700 steps: 64.4% in 6.7 minutes
              there).
  hour        the plain patchify ViT (4 blocks of width 128, 4 heads, GAP head, sin-cos posemb,
              0.67 M params) with bfloat16 matmul operands (float32 sums), 42,000 steps of batch
              64 keeping half the patch tokens, crop + flip, label smoothing 0.1, AdamW lr 1e-3,
              b2 0.99, decoupled wd 5e-5, 781 warmup steps + cosine to zero, flip TTA.
                  python train.py --config=configs/cifar10.py:hour --workdir=runs/cifar10-hour
              Measured (`make train CONFIG=configs/cifar10.py:hour` from a fresh clone, Intel
              Xeon): 81.1% top-1, 98.8% top-5 in 54.5 minutes (setup included) with XLA's
              bfloat16 dots; with MKL's (matmul_impl "auto" with the mkl extra, 6af4936):
              80.6% / 98.8% in 42.5 minutes, 1,086 images/s; with the one-pass LayerNorm,
              GELU and attention-gradient calls too (a813e35): 80.8% / 98.6% in 46.9 minutes on
              a slower sitting of the machine (963 images/s). On the AMD
              EPYC Zen 5 (AVX512_BF16, no AMX), the same command: 80.3% / 98.9% in 54.0
              minutes; on a later day the same machine ran the step 1.8x faster, and with
              --config.total_steps=64000 (82 epochs) gave 81.2% / 98.5% in 49.9 minutes: the
              model is near its plateau. Deeper is a little better: --config.model.depth=6
              --config.total_steps=44000 gave 81.7% / 98.7% there (about 48 minutes alone; the
              measured 67 were shared with test jobs). On a CPU with neither AMX nor
              AVX512_BF16, take hour-f32.
  hour-f32    the same model in float32, no crop, 38,000 steps.
              Measured (fresh clone, Intel Xeon): 79.9% top-1, 98.4% top-5; 64.0 minutes of
              wall time while test jobs shared the cores (it ran at 790 images/s alone before
              they started, ~53 minutes for the whole run at that rate).
  hour-conv   the conv-stem hybrid (GroupNorm), crop, 22,000 steps (its slower step).
              Measured (fresh clone, AMD EPYC): 77.4% top-1, 98.5% top-5 in 51.5 minutes.
              On the faster AMD EPYC Zen 5, with --config.total_steps=28000: 79.3% / 98.5%
              in 55.5 minutes.
  Ti/4, S/4   ViT-Ti/4 or S/4, 200 epochs (78k steps of batch 128), AdamW 1e-3, decoupled wd
              5e-5, warmup 5 epochs + cosine, RandAugment(2, 9), mixup 0.8 / cutmix 1.0, label
              smoothing 0.1, drop path 0.1: the DeiT-style recipe for small data. For
              accelerators: bfloat16 compute, float32 parameters and AdamW state. A GPU job:
                  python train.py --config=configs/cifar10.py:Ti/4 --workdir=runs/c10-ti4
              Not run here (no accelerator). Memory per device at batch 128, from
              `python bench/train_memory.py configs/cifar10.py:Ti/4 --devices 1` (XLA:CPU's
              buffer assignment of the real step, an estimate of a GPU's, see that file):
              Ti/4 2.2 GiB on 1 device, 0.35 GiB on 8 (16 images each); S/4 4.7 GiB on 1,
              0.89 GiB on 8. No gradient accumulation needed.
  ablation-base, short-proxy  the two bases of tools/cifar10_ablation.py (600 steps each).
"""

import ml_collections

from vit.config_schema import default_config, model_config

_TRAIN_IMAGES = 50_000
_SMALL = dict(width=128, depth=4, num_heads=4, mlp_dim=384, classifier="gap")


def _base() -> ml_collections.ConfigDict:
    c = default_config()
    c.dataset = "cifar10"
    c.train_split = "train"
    c.eval_split = "test"
    c.image_size = 32
    c.batch_size = 128
    c.eval_batch_size = 512  # divisible on 1, 2, 4 and 8 devices (tests/test_configs.py)
    c.pp.train_crop = "pad_crop"
    c.pp.crop_padding = 4
    c.pp.flip = True
    c.pp.normalize = "cifar10"
    c.optimizer = "adamw"
    c.b2 = 0.999
    c.grad_clip_norm = 1.0
    c.schedule = "cosine"
    return c


def _fast(stem: str, total_steps: int, batch_size: int = 64) -> ml_collections.ConfigDict:
    """The time-to-accuracy recipe (short, hour, hour-f32, hour-conv) at a given length."""
    c = _base()
    c.model = model_config("Ti/4", stem=stem, stem_norm="groupnorm", **_SMALL)
    c.model.posemb = "sincos2d"  # nothing to learn: +6.5 points at 600 steps
    c.b2 = 0.99  # Adam's second moment adapts faster: +2 points at 600 steps
    c.batch_size = batch_size
    c.lr = 1e-3
    c.weight_decay = 5e-5  # decoupled (vit/optim.py): 0.05 in PyTorch's AdamW at lr 1e-3
    c.label_smoothing = 0.1
    c.total_steps = total_steps
    c.warmup_steps = min(total_steps // 10, _TRAIN_IMAGES // batch_size)
    c.eval_tta = "flip"
    c.log_every = 50
    return c


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The CIFAR-10 config for `variant`: short (default), short-proxy, hour, hour-f32,
    hour-conv, Ti/4, S/4 or ablation-base."""
    variant = variant or "short"
    if variant == "short":
        # Half the patch tokens dropped in training (PatchDropout): 1.8x the steps in the same
        # time, +3.5 points over 1,500 steps with every token.
        # The plain patchify stem: 1.3x the conv stem's steps in the same time.
        c = _fast("patchify", total_steps=3_600)
        c.model.token_keep_ratio = 0.5
        c.pp.train_crop = "resize"  # no crop: at ~3 epochs augmentation costs more than it gives
        c.checkpoint_every = 1_200
        return c
    if variant == "short-proxy":  # the short recipe's first form (conv stem), cut to 600 steps
        c = get_config("short")
        c.model.stem = "conv"
        c.model.posemb, c.b2, c.model.token_keep_ratio = "learn", 0.999, 1.0
        c.total_steps, c.warmup_steps, c.checkpoint_every = 600, 60, 600
        c.eval_tta = "none"
        return c
    if variant == "ablation-base":  # tools/cifar10_ablation.py: ~3 minutes per row
        c = _fast("conv", total_steps=600)
        c.model.posemb, c.b2 = "learn", 0.999
        c.lr = 2e-3
        c.model.stem_norm = "layernorm"
        c.ema_decay = 0.999
        c.eval_tta = "none"
        c.checkpoint_every = 600
        return c
    if variant == "hour":
        # The plain patchify ViT (1.3x the conv stem's steps in the same time) with bfloat16
        # matmul operands (float32 sums, vit/matmul.py: ~1.25x the steps on a CPU with AMX),
        # and crop + flip: without the crop, train accuracy ran 11 points above test by the end.
        c = _fast("patchify", total_steps=42_000)
        c.model.token_keep_ratio = 0.5
        c.model.matmul_dtype = "bfloat16"
        c.eval_every = 4_000
        c.checkpoint_every = 4_000
        return c
    if variant == "hour-f32":  # float32, no crop: for CPUs without AMX
        c = _fast("patchify", total_steps=38_000)
        c.model.token_keep_ratio = 0.5
        c.pp.train_crop = "resize"
        c.eval_every = 4_000
        c.checkpoint_every = 4_000
        return c
    if variant == "hour-conv":  # the conv stem (a hybrid), with crop: slower steps
        c = _fast("conv", total_steps=22_000)
        c.model.token_keep_ratio = 0.5
        c.eval_every = 4_000
        c.checkpoint_every = 2_000
        return c
    if variant not in ("Ti/4", "S/4"):
        raise ValueError(f"unknown cifar10 variant {variant!r}: use short, short-proxy, hour, "
                         "hour-f32, hour-conv, Ti/4, S/4 or ablation-base")
    epoch = _TRAIN_IMAGES // 128
    c = _base()
    c.model = model_config(variant, drop_path_rate=0.1, dtype="bfloat16")  # float32 params
    c.lr = 1e-3
    c.weight_decay = 5e-5
    c.total_steps = 200 * epoch
    c.warmup_steps = 5 * epoch
    c.pp.randaugment_num_ops = 2
    c.pp.randaugment_magnitude = 9
    c.mixup_alpha = 0.8
    c.cutmix_alpha = 1.0
    c.label_smoothing = 0.1
    c.eval_every = 10 * epoch
    c.checkpoint_every = 5 * epoch
    c.log_every = 100
    return c
