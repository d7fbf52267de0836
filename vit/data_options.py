"""The data keys of a run config and the preprocessing options (`pp`): defaults and checks.

No TensorFlow here: a config is built and checked, and the train step normalises its pixels
(vit/normalization.py), where only JAX is installed (an accelerator image, say); the input
pipeline that reads these keys is vit/data.py and vit/preprocess.py.
"""

from __future__ import annotations

import ml_collections

from vit.model_options import is_int, pair

TRAIN_CROPS = ("pad_crop", "inception", "resize")
NORMALIZATIONS = {
    "minus_one_to_one": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),  # OpenAI
}


class DataError(ValueError):
    """Bad input data or data configuration; the message names the bad value and the fix."""


def default_options() -> ml_collections.ConfigDict:
    """The `pp` block of a config: preprocessing options with their defaults."""
    pp = ml_collections.ConfigDict()
    pp.train_crop = "pad_crop"  # "pad_crop" | "inception" (random-resized) | "resize"
    pp.crop_padding = 4  # pad_crop: zero padding on each side
    pp.inception_area_min = 0.08  # inception: range of the crop's share of the image area
    pp.inception_area_max = 1.0
    pp.flip = True  # random horizontal flip
    pp.randaugment_num_ops = 0  # 0 = off
    pp.randaugment_magnitude = 9  # 0..10
    pp.three_augment = False  # DeiT III's 3-Augment: grayscale | solarize | blur, then jitter
    pp.three_augment_jitter = 0.3  # its colour jitter strength in [0, 1); 0 = no jitter
    pp.normalize = "minus_one_to_one"  # | "imagenet" | "cifar10" (mean/std)
    pp.eval_resize = ml_collections.FieldReference(None, field_type=int)  # None: plain resize
    return pp


def validate_data_keys(config) -> None:
    """Raises a one-line DataError for a bad `pp` option, `image_size`, `seed` or
    `shuffle_buffer` of `config`."""
    validate_options(config.pp)
    size = config.image_size
    try:
        height, width = pair(size)
    except ValueError:
        raise DataError(f"config.image_size must be an int or a pair of ints (height, width), got "
                        f"{size!r}: use e.g. 32 or (32, 48)") from None
    if min(height, width) < 1:
        raise DataError(f"config.image_size must be positive, got {size!r}: use e.g. 32 or "
                        "(32, 48) (pixels a side, or height and width)")
    check_eval_resize(config)
    seed = config.seed
    if not is_int(seed) or not 0 <= seed < 2**31:
        raise DataError(f"config.seed must be an integer in [0, 2**31), got {seed!r}")
    buffer = config.get("shuffle_buffer", 1)  # an evaluation-only config may lack it
    if not is_int(buffer) or buffer < 1:
        raise DataError(f"config.shuffle_buffer must be an integer >= 1 (1 = no shuffling), got "
                        f"{buffer!r}")


def check_eval_resize(config) -> None:
    """Raises a one-line DataError unless config.pp.eval_resize is None or at least the shorter
    side of config.image_size."""
    resize_to, size = config.pp.get("eval_resize"), config.image_size
    if resize_to is None:
        return
    shorter = min(pair(size))
    if int(resize_to) < shorter:
        raise DataError(f"config.pp.eval_resize={resize_to} is smaller than image_size={size}; "
                        f"the central crop needs eval_resize >= image_size (its shorter side: "
                        f"{shorter}), or None to resize straight to image_size")


def validate_options(pp) -> None:
    """Raises a one-line DataError for an unknown `pp` key or value."""
    known = default_options()
    unknown = sorted(set(pp.keys()) - set(known.keys()))
    if unknown:
        raise DataError(f"unknown pp option(s) {unknown}; known: {sorted(known.keys())}")
    if pp.train_crop not in TRAIN_CROPS:
        raise DataError(f"pp.train_crop={pp.train_crop!r} is unknown; use one of {TRAIN_CROPS}")
    if pp.normalize not in NORMALIZATIONS:
        raise DataError(
            f"pp.normalize={pp.normalize!r} is unknown; use one of {sorted(NORMALIZATIONS)}"
        )
    for key in ("crop_padding", "randaugment_num_ops"):
        if int(pp[key]) < 0:
            raise DataError(f"pp.{key}={pp[key]} is negative; use 0 or more (0 = off)")
    if not 0 <= pp.randaugment_magnitude <= 10:
        raise DataError(
            f"pp.randaugment_magnitude={pp.randaugment_magnitude} is out of range; use 0..10"
        )
    if not 0 <= float(pp.get("three_augment_jitter", 0.0)) < 1:
        raise DataError(f"pp.three_augment_jitter={pp.three_augment_jitter} is out of range; use "
                        "[0, 1) (DeiT III: 0.3; 0 = no colour jitter)")
    if not 0 < pp.inception_area_min <= pp.inception_area_max <= 1:
        raise DataError(
            f"pp.inception_area_min/max={pp.inception_area_min}/"
            f"{pp.inception_area_max}: need 0 < min <= max <= 1"
        )


def default_config() -> ml_collections.ConfigDict:
    """The data keys of a run config with their defaults (a config starts from this)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dataset = "cifar10"  # TFDS name, or "folder:/path/root"
    c.data_dir = ml_collections.FieldReference(None, field_type=str)  # None: $TFDS_DATA_DIR
    c.manual_dir = ml_collections.FieldReference(None, field_type=str)  # e.g. ImageNet tars
    c.download = False
    c.train_split = "train"
    c.eval_split = "test"
    c.image_size = ml_collections.FieldReference(32, field_type=object)  # or (height, width)
    c.batch_size = 128  # global, across all processes and devices
    c.eval_batch_size = 256  # global
    c.shuffle_buffer = 50_000
    c.skip_corrupt = False
    # Class subset: label ids to keep (list or tuple), relabelled 0..k-1 in this order; None = all.
    c.classes = ml_collections.FieldReference(None, field_type=tuple)
    c.pp = default_options()  # the preprocessing options above
    return c


def on_dataset(config: ml_collections.ConfigDict, dataset: str | None = None,
               data_dir: str | None = None) -> ml_collections.ConfigDict:
    """`config` read from another `dataset` (all of its classes: a run's class subset names
    label ids of its own dataset) and/or `data_dir`, in place; None keeps the run's."""
    if dataset is not None:
        config.dataset, config.classes = dataset, None
    if data_dir is not None:
        config.data_dir = data_dir
    return config
