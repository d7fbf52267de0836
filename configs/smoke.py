"""The smallest run: a 2-block, width-32 ViT on 512 CIFAR-10 images for 8 steps.

Seconds on a CPU; used by the tests and as a quick check that everything is wired up:

    python train.py --config=configs/smoke.py --workdir=runs/smoke

Its accuracy is chance level (~10-20%): it exists to exercise the code, not to learn. It logs
no pictures to TensorBoard (eval_images=0): drawing them took a quarter of a run's time in the
test process; --config.eval_images=4 turns them on.
"""

import ml_collections

from vit.config_schema import default_config, model_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The smoke config; it has no variants, so `arg` must be empty."""
    if arg:
        raise ValueError(f"unknown smoke variant {arg!r}: configs/smoke.py has none; use "
                         "--config=configs/smoke.py")
    c = default_config()
    c.dataset = "cifar10"
    c.train_split = "train[:512]"
    c.eval_split = "test[:256]"
    c.image_size = 32
    c.batch_size = 32
    c.eval_batch_size = 64
    c.shuffle_buffer = 512
    c.model = model_config("Ti/8", width=32, depth=2, num_heads=2, mlp_dim=64)
    c.pp.train_crop = "pad_crop"
    c.pp.flip = True
    c.lr = 1e-3
    c.warmup_steps = 2
    c.total_steps = 8
    c.log_every = 4
    c.checkpoint_every = 4
    c.eval_images = 0
    return c
