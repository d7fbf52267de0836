"""Memory per device of a config's training step: XLA's buffer assignment of the real step.

Builds the model, optimizer and TrainState as vit/trainer.py does (`trainer.build_model`'s
`model_from_config`, `optim.make_optimizer` wrapped by `nonfinite.wrap_optimizer`,
`train_step.create_train_state`, `train_step.make_train_step` pmapped with the trainer's axis name
and donated state), but from abstract shapes (`jax.eval_shape`, `jax.ShapeDtypeStruct`): nothing is
initialised, no data is read, nothing runs. The step is lowered and compiled for one device with
the per-device batch of `--devices` devices; `compiled.memory_analysis()` gives its argument,
output, aliased (donated), temporary and generated-code bytes, and the exact parameter,
optimizer-state and EMA bytes come from the abstract state. `saved_activation_bytes` is what one
micro-batch's forward pass keeps for the backward pass, traced (jax.vjp residuals, in the program's
own dtypes, on no backend). Prints one JSON line.

Run on a GPU, the figures are XLA:GPU's own buffer assignment (B/16 at 384 px, micro-batch 32, on an
H200 with XLA's fused attention: 17.4 GiB, 7.8 GiB with `--remat block`). On a CPU they are
XLA:CPU's: an estimate of a GPU's, not a GPU measurement. XLA:GPU fuses and schedules differently.
XLA:CPU computes most bfloat16 operations in float32, so a bfloat16 config's buffers come out about
as large as in float32 here (B/16 at 384 px, 64 images: 70.2 GiB bfloat16, 70.1 GiB float32) while
the traced saved activations shrink by a third (44.4 GiB, 69.3 GiB): for bfloat16 the figure is an
upper bound. Attention is modelled as the GPU runs it ("auto" resolved for `--platform gpu`), but
off a GPU cuDNN's kernel cannot compile and XLA's `jax.nn.dot_product_attention` stands in: it keeps
the [heads, tokens, tokens] probabilities cuDNN's flash attention does not, another upper bound.
The all-reduce buffers of a real multi-device pmean are absent (one device here).

Run (nice it: compiling B/16 at 384 px takes minutes on a 2-core CPU):
    python bench/train_memory.py configs/imagenet.py:B/16 --devices 8
    python bench/train_memory.py configs/finetune.py:B/16-cifar10 --devices 1
    python bench/train_memory.py configs/imagenet.py:B/16 --devices 8 --remat block
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_description  # noqa: E402

from vit import parallel, train_step  # noqa: E402
from vit.model import init_params, model_from_config  # noqa: E402

GIB = 2**30
_NUM_CLASSES = {"imagenet2012": 1000, "cifar10": 10, "cifar100": 100}


def load_config(spec: str) -> Any:
    """The config a "path/to/config.py[:variant]" string names, as train.py's --config reads it."""
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem + "_config", path)
    if module_spec is None or module_spec.loader is None:
        raise FileNotFoundError(f"no config file at {path!r}; give e.g. configs/imagenet.py:B/16")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant or None)


def num_classes_of(config: Any) -> int:
    """The number of classes the run's head has, without opening the dataset."""
    if config.get("classes"):
        return len(config.classes)
    if config.dataset not in _NUM_CLASSES:
        raise ValueError(f"unknown number of classes for dataset {config.dataset!r}: pass "
                         f"num_classes= (known: {', '.join(_NUM_CLASSES)})")
    return _NUM_CLASSES[config.dataset]


def tree_bytes(tree: Any) -> int:
    """Total bytes of the (abstract or concrete) arrays in `tree`."""
    return int(sum(np.prod(x.shape, dtype=np.int64) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(tree)))


def saved_activation_bytes(model: Any, params: Any, micro_batch: int) -> int:
    """Bytes the forward pass of one micro-batch keeps for the backward pass (jax.vjp residuals).

    Traced, not compiled: the dtypes are the program's own (bfloat16 where it computes in
    bfloat16), before any backend fuses or rematerialises; the same on every backend.
    """
    images = jax.ShapeDtypeStruct((micro_batch, *model.image_size, 3), jnp.float32)

    def residuals(p: Any, x: jax.Array) -> Any:
        forward = lambda q: model.apply({"params": q}, x, train=True,
                                        rngs={"dropout": jax.random.PRNGKey(0)})
        return jax.vjp(forward, p)[1]  # a pytree whose leaves are the residuals

    return tree_bytes(jax.eval_shape(residuals, params, images))


def _with_device_axis(tree: Any) -> Any:
    """Abstract leaves with pmap's leading device axis of size 1."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((1, *x.shape), x.dtype), tree)


def measure(config: Any, *, devices: int = 8, per_device_batch: int | None = None,
            num_classes: int | None = None, platform: str = "gpu",
            image_dtype: str = "uint8") -> dict[str, Any]:
    """Compile `config`'s train step on abstract inputs and report its memory per device.

    `per_device_batch` defaults to config.batch_size // devices; `platform` is where the model
    is meant to run (it resolves attention "auto"); `image_dtype` is the batch's pixels (uint8,
    as data.train_iterator yields them). Nothing is initialised or executed.
    """
    if per_device_batch is None:
        if config.batch_size % devices:
            raise ValueError(f"batch_size={config.batch_size} does not split over {devices} "
                             "devices: pass per_device_batch=")
        per_device_batch = config.batch_size // devices
    accum = int(config.grad_accum_steps)
    if per_device_batch % accum:
        raise ValueError(f"per-device batch {per_device_batch} is not divisible by "
                         f"grad_accum_steps={accum}")
    classes = num_classes or num_classes_of(config)
    model = model_from_config(config.model, num_classes=classes, image_size=config.image_size,
                              platform=platform)
    if model.attention_impl == "cudnn" and jax.default_backend() != "gpu":
        model = model.clone(attention_impl="fused")  # cuDNN's kernel compiles on a GPU only
    key = jax.random.PRNGKey(0)
    params = jax.eval_shape(functools.partial(init_params, model), key)
    tx = train_step.train_optimizer(config, params)
    state = jax.eval_shape(lambda p, r: train_step.fresh_state(config, p, tx, r), params, key)
    batch = {"image": jax.ShapeDtypeStruct((per_device_batch, *model.image_size, 3), image_dtype),
             "label": jax.ShapeDtypeStruct((per_device_batch,), jnp.int32)}
    step = jax.pmap(train_step.make_train_step(model, tx, config, classes),
                    axis_name=parallel.AXIS, donate_argnums=(0,))
    start = time.perf_counter()
    compiled = step.lower(_with_device_axis(state), _with_device_axis(batch)).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    fields = {name: int(getattr(mem, f"{name}_size_in_bytes")) for name in
              ("argument", "output", "alias", "temp", "generated_code")}
    peak = (fields["argument"] + fields["output"] - fields["alias"] + fields["temp"]
            + fields["generated_code"])
    param_count = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
    return {
        "variant": config.model.variant, "image_size": config.image_size,
        "dtype": str(config.model.dtype),
        "remat": model.remat,
        "param_dtypes": sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(params)}),
        "attention_impl": model.attention_impl, "platform_modelled": platform,
        "image_dtype": image_dtype, "global_batch": per_device_batch * devices, "devices": devices,
        "per_device_batch": per_device_batch, "grad_accum_steps": accum,
        "micro_batch": per_device_batch // accum,
        "param_count": param_count, "param_bytes": tree_bytes(params),
        "opt_state_bytes": tree_bytes(state.opt_state), "ema_bytes": tree_bytes(state.ema_params),
        **{f"{name}_bytes": value for name, value in fields.items()},
        "peak_bytes": peak, "peak_gib": round(peak / GIB, 2),
        "saved_activation_bytes": saved_activation_bytes(model, params, per_device_batch // accum),
        "compile_s": round(compile_s, 1),
        "estimate": (f"XLA:{jax.default_backend().upper()} buffer assignment of the per-device "
                     "step" + ("" if jax.default_backend() == platform else
                               f", not a {platform.upper()} measurement")),
    }


def main() -> None:
    """Parse the command line, measure, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="config file and variant, e.g. configs/imagenet.py:B/16")
    parser.add_argument("--devices", type=int, default=8, help="devices the batch splits over")
    parser.add_argument("--per_device_batch", type=int, default=None,
                        help="images per device per step (default: batch_size / devices)")
    parser.add_argument("--grad_accum_steps", type=int, default=None,
                        help="override the config's micro-batches per step")
    parser.add_argument("--dtype", default=None, help="override config.model.dtype (compute)")
    parser.add_argument("--remat", default=None,
                        help="override config.model.remat: none, block or dots")
    parser.add_argument("--num_classes", type=int, default=None)
    parser.add_argument("--platform", default="gpu", help="where the model is meant to run")
    parser.add_argument("--image_dtype", default="uint8", help="the batch's pixels")
    args = parser.parse_args()
    if args.per_device_batch is not None and args.per_device_batch < 1:
        parser.error(f"--per_device_batch must be >= 1, got {args.per_device_batch}")
    try:  # a missing or failing config file, an unknown variant or key: one line
        config = load_config(args.config)
    except (OSError, ValueError, KeyError, AttributeError) as err:
        parser.error(f"{args.config}: {err}")
    if args.grad_accum_steps is not None:
        config.grad_accum_steps = args.grad_accum_steps
    if args.dtype is not None:
        config.model.dtype = args.dtype
    if args.remat is not None:
        config.model.remat = args.remat
    result = measure(config, devices=args.devices, per_device_batch=args.per_device_batch,
                     num_classes=args.num_classes, platform=args.platform,
                     image_dtype=args.image_dtype)
    print(json.dumps({"bench": "train_memory", "config": args.config, **result,
                      "machine": cpu_description(), "jax": jax.__version__}))


if __name__ == "__main__":
    main()
