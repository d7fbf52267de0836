"""Non-finite losses: stop at the last good checkpoint (default), or skip a few updates (opt-in).

Default (`skip_nonfinite=0`): the first NaN / infinite loss (or parameter) stops the run with
one line naming the step. Nothing is saved after it, so the latest checkpoint is the last good
one.

Opt-in (`skip_nonfinite=N`): the optimizer is wrapped in `optax.apply_if_finite(tx, N)`. An
update whose gradients are not finite is dropped: parameters, optimizer state and EMA stay as
they were, while the step counter (and so the data position) advances. Skips are counted
(`train/skipped_steps`, and a warning per skip); the (N+1)-th non-finite update in a row stops
the run as above. The counts live in the optimizer state, so they are checkpointed. Gradients
are averaged over every device of every process before the check, so all processes skip the
same steps and stop at the same step with the same message.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
log = logging.getLogger(__name__)

_STREAK, _SKIPPED = "nonfinite_streak", "skipped_steps"


class NonFiniteLossError(RuntimeError):
    """The training loss (or the parameters) became NaN or infinite."""


def wrap_optimizer(tx: optax.GradientTransformation, cap: int) -> optax.GradientTransformation:
    """`tx` skipping up to `cap` non-finite updates in a row; `tx` itself when cap is 0."""
    if cap < 0:
        raise ValueError(f"skip_nonfinite must be >= 0 (0 = stop at the first), got {cap}")
    return optax.apply_if_finite(tx, int(cap)) if cap else tx


def guard(opt_state: PyTree, cap: int, new: PyTree, old: PyTree) -> PyTree:
    """`new` where the update was applied, `old` where it was skipped (cap 0: always `new`)."""
    if not cap:
        return new
    applied = jnp.logical_or(opt_state.last_finite, opt_state.notfinite_count > cap)
    return jax.tree_util.tree_map(lambda n, o: jnp.where(applied, n, o), new, old)


def applied_updates(opt_state: PyTree, cap: int, step: jax.Array) -> jax.Array:
    """Updates applied before `step`: the count the optimizer's schedule is at (skipped updates
    roll it back, so it runs behind the step by the number skipped)."""
    return step - opt_state.total_notfinite if cap else step


def skip_metrics(opt_state: PyTree, cap: int) -> dict[str, jax.Array]:
    """The skip counters as step metrics (none when skipping is off)."""
    if not cap:
        return {}
    return {_STREAK: opt_state.notfinite_count.astype(jnp.float32),
            _SKIPPED: opt_state.total_notfinite.astype(jnp.float32)}


def error(what: str, step: int) -> NonFiniteLossError:
    """The one-line error for a non-finite value first seen at `step`."""
    return NonFiniteLossError(
        f"{what} at step {step}: lower the learning rate (lr) or the gradient-clipping norm "
        "(grad_clip_norm); the last good checkpoint is kept")


def non_finite_names(params: PyTree) -> list[str]:
    """The '/'-joined names of the parameters that hold a NaN or an infinity."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return ["/".join(str(getattr(k, "key", k)) for k in path) for path, x in leaves
            if not np.isfinite(np.asarray(x)).all()]


def check_finite_params(params: PyTree, step: int) -> None:
    """NonFiniteLossError when any parameter is NaN or infinite."""
    if non_finite_names(params):
        raise error("parameters became non-finite", step)


class StepMetrics:
    """Device metrics of recent steps, fetched to the host (and checked) only when asked.

    The applied steps since the last `window_means` are summed in step order; `window_state`
    and `restore_window` carry that partial window through a checkpoint, so a run resumed
    between two log steps logs the same values as one that never stopped.
    """

    def __init__(self, skip_cap: int = 0) -> None:
        self.skip_cap = skip_cap
        self.skipped = 0  # non-finite updates skipped so far (the run's total when resumed)
        self._pending: list[tuple[int, dict]] = []
        self._sums: dict[str, float] = {}
        self._count = 0
        self._last: dict[str, float] = {}  # the latest applied step's values

    def add(self, step: int, device_metrics: dict) -> None:
        """Keep one step's (replicated) device metrics without waiting for them."""
        self._pending.append((step, device_metrics))

    def check(self) -> None:
        """Fetch the pending steps; NonFiniteLossError names the first step that must stop."""
        pending, self._pending = self._pending, []
        for step, values in jax.device_get(pending):
            host = {k: float(v[0]) for k, v in values.items()}
            streak = int(host.pop(_STREAK, 0))
            self.skipped = int(host.pop(_SKIPPED, self.skipped))
            if streak > self.skip_cap:
                raise error(f"{streak} non-finite updates in a row (more than "
                            f"skip_nonfinite={self.skip_cap})", step)
            if streak:
                log.warning("step %d: non-finite gradients, update skipped (%d in a row, %d in "
                            "all; skip_nonfinite=%d)", step, streak, self.skipped, self.skip_cap)
                continue
            if not np.isfinite(host["loss"]):
                raise error(f"loss became {host['loss']}", step)
            self._accumulate(host)

    def _accumulate(self, host: dict[str, float]) -> None:
        for key, value in host.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._count += 1
        self._last = host

    def window_means(self) -> dict[str, float]:
        """Check, then every metric's mean over the applied steps since the last call; `lr` is
        the rate of the window's last applied step, the one the optimizer used last."""
        self.check()
        means = {k: total / self._count for k, total in self._sums.items()}
        if "lr" in self._last:
            means["lr"] = self._last["lr"]
        if self.skip_cap:
            means[_SKIPPED] = float(self.skipped)
        self.restore_window(None)
        return means

    def window_state(self) -> dict[str, Any]:
        """The checked steps since the last `window_means`, as JSON for a checkpoint."""
        self.check()
        return {"count": self._count, "sums": dict(self._sums), "last": dict(self._last)}

    def restore_window(self, saved: dict[str, Any] | None) -> None:
        """Continue the window `window_state` returned (None: start an empty one)."""
        saved = saved or {}
        self._count = int(saved.get("count", 0))
        self._sums = {k: float(v) for k, v in saved.get("sums", {}).items()}
        self._last = {k: float(v) for k, v in saved.get("last", {}).items()}
