"""`vit prune`: structured (attention heads, MLP channels) and unstructured magnitude pruning.

- `structured`: in every block, the `sparsity` share of attention heads and of MLP hidden
  channels with the lowest importance go. Importance is a weight-magnitude score:
  head h: ||W_value[:, h]||_F * ||W_out[h, :]||_F (what the head can add to the residual
  stream); MLP channel j: ||W_fc1[:, j]||_2 * ||W_fc2[j, :]||_2. Pruned MLP channels are cut
  out (`mlp_dim` shrinks: a smaller, faster model); a pruned head has its query / key / value
  columns and out-projection rows zeroed, so its output is exactly zero (the attention module
  keeps head_dim = width / heads, so heads cannot be cut out without changing it).
- `magnitude`: the `sparsity` share of all attention and MLP kernel entries with the smallest
  |w|, one global threshold (Han et al., 2015); zeroed in place (no speed-up on dense kernels).

`finetune_steps > 0` then trains the pruned model briefly on the run's training data (its
augmentation and label smoothing; AdamW, the learning rate warmed up over the first tenth of the
steps and cosine-decayed towards 0, as a recovery from a trained minimum needs) with the pruned
entries held at exactly zero: their gradients are masked before clipping and AdamW, so they
neither move nor use up the clipping norm, and the params are masked again after each update.
Dropout and stochastic depth stay as the run trained (it is training), but PatchDropout
(`token_keep_ratio`) is off: it is a throughput device for long runs from scratch, and over a
short recovery it only trains the model on half the tokens it will be evaluated on. With
`distill_alpha > 0` the unpruned model is the teacher (vit/distill.py, soft at temperature 1):
the loss puts that share on matching its outputs, the rest on the labels. Params that
became non-finite in it are a NonFiniteLossError, and nothing is written.

Refused with one line before anything is written: `structured` on a MAP-head model (the head's
MLP shares config.model.mlp_dim with the encoder, and the config has one MLP width, so the cut
model could not be built; `magnitude` prunes it), `structured` on SwiGLU MLPs (a channel is a
gate and a value column), and either method on a depth-0 model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from vit.nonfinite import NonFiniteLossError, non_finite_names
from vit.optim import learning_rate_schedule
from vit.weight_formats import flatten_params

PyTree = Any
METHODS = ("structured", "magnitude")
_ATTN = "MultiHeadDotProductAttention_1"


@dataclasses.dataclass
class PruneResult:
    """Where the pruned checkpoint went and how much of the encoder is now zero or gone."""

    path: str
    method: str
    sparsity: float
    removed_fraction: float  # of the prunable (attention + MLP) kernel entries
    mlp_dim: int
    finetune_steps: int

    def summary(self) -> str:
        """One line for the CLI."""
        return (f"wrote {self.path}: {self.method} pruning at {self.sparsity:.0%}, "
                f"{self.removed_fraction:.1%} of attention + MLP weights removed, mlp_dim "
                f"{self.mlp_dim}, fine-tuned {self.finetune_steps} steps")


def _blocks(flat: dict[str, np.ndarray]) -> list[str]:
    """The encoder blocks' name prefixes; ValueError for a model without any (depth 0)."""
    depth = len({k.split("/")[1] for k in flat if k.startswith("Transformer/encoderblock_")})
    if not depth:
        raise ValueError("the model has no encoder blocks (depth 0), so there are no attention "
                         "heads or MLP channels to prune; prune a model with depth >= 1")
    return [f"Transformer/encoderblock_{i}/" for i in range(depth)]


def head_scores(flat: dict[str, np.ndarray], block: str) -> np.ndarray:
    """[heads] importance of each head of a block: ||W_value[:, h]||_F * ||W_out[h]||_F."""
    value = flat[block + _ATTN + "/value/kernel"]  # [D, H, d]
    out = flat[block + _ATTN + "/out/kernel"]  # [H, d, D]
    return (np.sqrt((value ** 2).sum(axis=(0, 2))) * np.sqrt((out ** 2).sum(axis=(1, 2))))


def mlp_scores(flat: dict[str, np.ndarray], block: str) -> np.ndarray:
    """[mlp_dim] importance of each hidden MLP channel: ||W_fc1[:, j]|| * ||W_fc2[j, :]||."""
    fc1 = flat[block + "MlpBlock_3/Dense_0/kernel"]
    fc2 = flat[block + "MlpBlock_3/Dense_1/kernel"]
    return np.linalg.norm(fc1, axis=0) * np.linalg.norm(fc2, axis=1)


def _prunable(name: str) -> bool:
    """Attention and MLP kernels: the encoder blocks' and a MAP head's."""
    return name.endswith("/kernel") and ("/MultiHeadDotProductAttention_" in name
                                         or "/MlpBlock_" in name)


def _count(sparsity: float, n: int) -> int:
    """How many of `n` items `sparsity` removes, halves rounded up."""
    return math.floor(sparsity * n + 0.5)


def _cut(sparsity: float, n: int, what: str) -> int:
    """How many of a block's `n` heads or channels `sparsity` removes; a ValueError when that is
    all of them."""
    count = _count(sparsity, n)
    if count >= n:
        raise ValueError(f"sparsity {sparsity:g} would remove all {n} {what} of each block; use "
                         f"a sparsity below {(n - 0.5) / n:.3g}")
    return count


def prune_structured(params: PyTree, sparsity: float) -> tuple[PyTree, PyTree, int]:
    """(params with heads zeroed and MLP channels cut, their 0/1 masks, the new mlp_dim)."""
    flat = {k: np.array(v) for k, v in flatten_params(params).items()}
    masks = {k: np.ones_like(v) for k, v in flat.items()}
    mlp_dim = None
    for block in _blocks(flat):
        scores = head_scores(flat, block)
        gone = np.argsort(scores, kind="stable")[:_cut(sparsity, len(scores), "attention heads")]
        for name in ("query", "key", "value"):
            for leaf in ("kernel", "bias"):
                key = f"{block}{_ATTN}/{name}/{leaf}"
                if key in masks:  # no key/bias with key_bias=False
                    masks[key][..., gone, :] = 0  # kernel [D, H, d], bias [H, d]
        masks[f"{block}{_ATTN}/out/kernel"][gone] = 0
        scores = mlp_scores(flat, block)
        cut = _cut(sparsity, len(scores), "MLP channels")
        keep = np.sort(np.argsort(-scores, kind="stable")[:len(scores) - cut])
        mlp_dim = len(keep)
        for key, axis in (("Dense_0/kernel", 1), ("Dense_0/bias", 0), ("Dense_1/kernel", 0)):
            key = f"{block}MlpBlock_3/{key}"
            flat[key] = np.take(flat[key], keep, axis=axis)
            masks[key] = np.take(masks[key], keep, axis=axis)
    flat = {k: v * masks[k] for k, v in flat.items()}
    unflat = lambda t: traverse_util.unflatten_dict(t, sep="/")
    return unflat(flat), unflat(masks), int(mlp_dim)


def prune_magnitude(params: PyTree, sparsity: float) -> tuple[PyTree, PyTree]:
    """(params with the smallest |w| of every attention / MLP kernel zeroed, their masks)."""
    flat = {k: np.asarray(v) for k, v in flatten_params(params).items()}
    _blocks(flat)  # a depth-0 model has nothing to prune
    prunable = [k for k in flat if _prunable(k)]
    values = np.concatenate([np.abs(flat[k]).ravel() for k in prunable])
    count = _count(sparsity, values.size)
    threshold = np.partition(values, count - 1)[count - 1] if count else -1.0
    masks = {k: (np.abs(v) > threshold).astype(v.dtype) if k in prunable else np.ones_like(v)
             for k, v in flat.items()}
    unflat = lambda t: traverse_util.unflatten_dict(t, sep="/")
    return unflat({k: v * masks[k] for k, v in flat.items()}), unflat(masks)


def removed_fraction(params: PyTree, original: PyTree) -> float:
    """Share of the original attention + MLP kernel entries that are now zero or cut out."""
    before = {k: np.asarray(v) for k, v in flatten_params(original).items() if _prunable(k)}
    after = {k: np.asarray(v) for k, v in flatten_params(params).items() if _prunable(k)}
    total = sum(v.size for v in before.values())
    kept = sum(int(np.count_nonzero(v)) for v in after.values())
    return 1.0 - kept / max(total, 1)


def finetune_schedule(lr: float, steps: int) -> optax.Schedule:
    """The trainer's warmup + cosine schedule for a `steps`-step fine-tune at peak `lr`: linear
    warmup over the first tenth of the steps, then a cosine decay to 0 at t = `steps`."""
    return learning_rate_schedule({"lr": lr, "warmup_steps": steps // 10, "total_steps": steps,
                                   "schedule": "cosine", "min_lr_ratio": 0.0})


def finetune(model: Any, params: PyTree, masks: PyTree, config: Any, steps: int, *,
             lr: float = 1e-4, teacher: Any = None, distill_alpha: float = 0.0) -> PyTree:
    """`steps` of AdamW (peak `lr`, `finetune_schedule`) on the run's training data, all patch
    tokens kept (no PatchDropout), pruned entries (masks == 0) held at exactly zero; with a
    `teacher` (a vit.distill.Teacher), `distill_alpha` of the loss matches its outputs."""
    from vit import data, distill, losses, preprocess
    from vit.mix import smooth_labels

    model = model.clone(token_keep_ratio=1.0)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(finetune_schedule(lr, steps), weight_decay=0.0))
    smoothing, classes = float(config.get("label_smoothing", 0.0)), model.num_classes
    loss_name = config.get("loss", losses.DEFAULT)  # the loss the checkpoint was trained with
    hold = lambda tree: jax.tree_util.tree_map(lambda x, m: x * m, tree, masks)
    soft = distill.default_config()
    soft.alpha = float(distill_alpha)

    @jax.jit
    def step(params, opt_state, images, labels, rng, teacher_params):
        images = preprocess.normalize_on_device(images, config.pp.normalize)  # uint8 batches

        targets = smooth_labels(labels, classes, smoothing)
        taught = None if teacher is None else distill.teacher_logits(
            teacher, teacher_params, images, config.pp.normalize)

        def loss_fn(p):
            logits = model.apply({"params": p}, images, train=True, rngs={"dropout": rng})
            return distill.training_loss(logits, targets, taught, soft, loss_name)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(hold(grads), opt_state, params)
        return hold(optax.apply_updates(params, updates)), opt_state, loss

    params = jax.tree_util.tree_map(jnp.asarray, params)
    opt_state = tx.init(params)
    batches = data.train_iterator(config, num_devices=1)
    frozen = None if teacher is None else jax.tree_util.tree_map(jnp.asarray, teacher.params)
    rng = jax.random.PRNGKey(int(config.get("seed", 0)))
    for i in range(steps):
        batch = next(batches)
        params, opt_state, _ = step(params, opt_state, batch["image"][0], batch["label"][0],
                                    jax.random.fold_in(rng, i), frozen)
    return jax.tree_util.tree_map(np.asarray, params)


def prune_checkpoint(src: str, dst: str, *, method: str, sparsity: float,
                     finetune_steps: int = 0, lr: float = 1e-4, use_ema: bool = False,
                     dataset: str | None = None, data_dir: str | None = None,
                     distill_alpha: float = 0.0) -> PruneResult:
    """Prune checkpoint `src` into workdir `dst` (optionally fine-tuned on its run's dataset, or
    on `dataset` read from `data_dir`: weights converted from a file name none, distilling
    `distill_alpha` of the loss from the unpruned model); see the module doc."""
    import ml_collections

    from vit.checkpoint import load_checkpoint, write_params
    from vit.model import saved_model_from_config

    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; use one of {', '.join(METHODS)}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if not 0.0 <= distill_alpha <= 1.0 or (distill_alpha and not finetune_steps):
        raise ValueError(f"--distill {distill_alpha:g}: the teacher's share of the fine-tuning "
                         "loss must be in [0, 1], and it needs --finetune-steps")
    contents = load_checkpoint(src)
    original = contents.chosen_params(use_ema)
    if contents.config.get("model", {}).get("quant", "none") != "none":
        raise ValueError("prune the float checkpoint, then quantize the pruned one")
    config = ml_collections.ConfigDict(contents.config)
    for key, value in (("dataset", dataset), ("data_dir", data_dir)):
        if value is not None:
            config[key] = value
    if method == "structured" and "MAPHead_0" in original:
        raise ValueError("structured pruning cuts config.model.mlp_dim, which the MAP head's MLP "
                         "(MAPHead_0/MlpBlock_0) shares with the encoder, so the pruned model "
                         "could not be built; prune a MAP-head model with --method magnitude")
    if method == "structured" and config.get("model", {}).get("mlp_norm"):
        raise ValueError("structured pruning cuts MLP channels, over which mlp_norm's LayerNorm "
                         "(MlpBlock_3/hidden_norm) normalises: its outputs would change; prune "
                         "the model with --method magnitude")
    if method == "structured" and config.get("model", {}).get("swiglu"):
        raise ValueError("structured pruning cuts MLP channels one Dense_0 column at a time, and "
                         "a SwiGLU MLP's channel is two (gate and value); prune it with --method "
                         "magnitude")
    if method == "structured":
        params, masks, mlp_dim = prune_structured(original, sparsity)
        config.model.mlp_dim = mlp_dim
    else:
        params, masks = prune_magnitude(original, sparsity)
        mlp_dim = int(flatten_params(params)[
            "Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel"].shape[0])
    if finetune_steps:
        classes = int(contents.dataset_info["num_classes"])
        model = saved_model_from_config(config.model.to_dict(), num_classes=classes,
                                        image_size=config.image_size)
        teacher = None
        if distill_alpha:
            from vit.distill import Teacher

            dense = saved_model_from_config(contents.config["model"], num_classes=classes,
                                            image_size=config.image_size)
            teacher = Teacher(dense, original, str(config.pp.normalize))
        params = finetune(model, params, masks, config, finetune_steps, lr=lr, teacher=teacher,
                          distill_alpha=distill_alpha)
        if non_finite_names(params):
            raise NonFiniteLossError(
                f"the params became non-finite in the {finetune_steps} --finetune-steps, so "
                f"nothing was written to {dst}: lower --lr (now {lr:g})")
    path = write_params(dst, contents.step, params, config.to_dict(), contents.dataset_info)
    return PruneResult(path, method, sparsity,
                       removed_fraction(params, original), mlp_dim, finetune_steps)
