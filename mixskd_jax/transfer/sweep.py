"""Training K copies of a small model at K learning rates with one compiled step.

The fair transfer protocol (`mixskd_jax.transfer`) picks each backbone's learning rate on
validation data. Compiling one training run per rate would cost more than the training itself,
so the peak learning rate is an argument of the jitted step, not a constant in it: one
compilation serves every rate, backbone and seed. The data are small enough to live on the
device; every step's batch is gathered there from an index table drawn on the host.

The copies and their steps are driven from Python. Moving the loops into the program was much
slower on XLA:CPU (2 cores, jax 0.10.2): a fine-tuning step of `small_resnet` on 50 images took
81 ms jitted alone and 1,537 ms per step inside `lax.scan` over steps and `lax.map` over
copies; with `jax.vmap` over copies instead of `lax.map`, one sweep did not finish in 15
minutes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixskd_jax.method.optimizer import reference_sgd
from mixskd_jax.method.schedule import reference_schedule

# loss_fn(params, state, inputs, targets) -> (scalar loss, new state): one copy, one batch.
LossFn = Callable[[Any, Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class Recipe:
  """One downstream training recipe (the peak learning rate is swept, not set here).

  Attributes:
    epochs: passes over the training examples.
    batch_size: examples per step; the remainder of an epoch is dropped.
    warmup_epochs: epochs of per-step linear warm-up before the per-epoch schedule.
    schedule: `config.choices.SCHEDULES` ("cosine", "constant", "multistep").
    momentum, nesterov, weight_decay: the reference SGD's (coupled L2 decay).
  """
  epochs: int
  batch_size: int
  warmup_epochs: int
  schedule: str
  momentum: float
  nesterov: bool
  weight_decay: float

  def steps_per_epoch(self, num_examples: int) -> int:
    steps = num_examples // self.batch_size
    if steps < 1:
      raise ValueError(f"batch_size={self.batch_size} is larger than the {num_examples} "
                       "training examples; lower the transfer recipe's batch_size.")
    return steps


def batch_order(num_examples: int, recipe: Recipe, seed: int) -> np.ndarray:
  """(epochs * steps_per_epoch, batch_size) example indices: epoch e visits the examples in the
  order `np.random.default_rng([seed, e]).permutation(num_examples)`, as the trainer does."""
  steps = recipe.steps_per_epoch(num_examples)
  order = [np.random.default_rng([seed, e]).permutation(num_examples)[:steps * recipe.batch_size]
           for e in range(recipe.epochs)]
  return np.concatenate(order).reshape(-1, recipe.batch_size).astype(np.int32)


def stack_copies(tree: Any, k: int) -> Any:
  """`tree` repeated on a new leading axis of size `k`."""
  return jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (k,) + jnp.shape(x)), tree)


def train_sweep(loss_fn: LossFn, params: Any, state: Any, inputs: Any, targets: jax.Array, *,
                learning_rates: np.ndarray, recipe: Recipe, seed: int
                ) -> tuple[Any, Any, np.ndarray]:
  """Trains the K copies `params[k]`, `state[k]` at peak rate `learning_rates[k]`.

  Args:
    loss_fn: one copy's loss on one batch, and its new state (e.g. BatchNorm statistics).
    params: the trained pytree, every leaf with a leading axis of size K.
    state: the rest of the copies' variables (leading axis K; `{}` when there is none).
    inputs: (N, ...) training inputs (a pytree of arrays with N rows), shared by every copy.
    targets: (N, ...) their targets.
    learning_rates: (K,) peak learning rates.
    recipe: epochs, batch and optimizer; the data order comes from `seed` (`batch_order`).

  Returns:
    (params, state, losses): the trained copies (leading axis K) and the (K, steps) training
    loss of every step.
  """
  num_examples = int(targets.shape[0])
  order = jnp.asarray(batch_order(num_examples, recipe, seed))
  steps_per_epoch = recipe.steps_per_epoch(num_examples)
  step = _compiled_step(loss_fn, recipe, steps_per_epoch)
  tx = unit_peak_optimizer(recipe, steps_per_epoch)
  inputs = jax.tree.map(jnp.asarray, inputs)
  targets = jnp.asarray(targets)
  trained, losses = [], []
  for k, rate in enumerate(np.asarray(learning_rates, np.float32)):
    p, s = jax.tree.map(lambda x: jnp.array(x[k]), (params, state))
    opt_state = tx.init(p)
    copy_losses = []
    for index in order:
      p, s, opt_state, loss = step(p, s, opt_state, rate, inputs, targets, index)
      copy_losses.append(loss)
    trained.append((p, s))
    losses.append(np.asarray(jnp.stack(copy_losses)))
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *trained)
  return stacked[0], stacked[1], np.stack(losses)


def stacked_outputs(apply_one: Callable, copies: tuple, inputs: Any, *, chunk: int) -> np.ndarray:
  """(K, N, ...) outputs of `apply_one(*copy_k, rows)` for every stacked copy k, over chunks of
  `chunk` rows of `inputs` (a pytree of (N, ...) arrays): copies and chunks in Python loops,
  as training (see above)."""
  n = jax.tree.leaves(inputs)[0].shape[0]
  k = jax.tree.leaves(copies)[0].shape[0]
  out = []
  for i in range(k):
    copy = jax.tree.map(lambda x: x[i], copies)
    out.append(np.concatenate([
        np.asarray(apply_one(*copy, jax.tree.map(lambda a: a[s:s + chunk], inputs)))
        for s in range(0, n, chunk)]))
  return np.stack(out)


def unit_peak_optimizer(recipe: Recipe, steps_per_epoch: int) -> optax.GradientTransformation:
  """The recipe's SGD on its schedule, for a peak learning rate of 1."""
  shape = reference_schedule(base_lr=1.0, steps_per_epoch=steps_per_epoch,
                             num_epochs=recipe.epochs, warmup_epochs=recipe.warmup_epochs,
                             schedule=recipe.schedule)
  return reference_sgd(shape, momentum=recipe.momentum, nesterov=recipe.nesterov,
                       weight_decay=recipe.weight_decay)


# One step per (loss, recipe, epoch length): every rate, backbone and seed of a sweep reuses it.
@functools.lru_cache(maxsize=32)
def _compiled_step(loss_fn: LossFn, recipe: Recipe, steps_per_epoch: int):
  tx = unit_peak_optimizer(recipe, steps_per_epoch)

  def step(params, state, opt_state, rate, inputs, targets, index):
    x = jax.tree.map(lambda a: a[index], inputs)
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, state, x, targets[index])
    updates, opt_state = tx.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: rate * u, updates)
    return optax.apply_updates(params, updates), state, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1, 2))
