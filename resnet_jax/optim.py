"""SGD as the paper ran it: Caffe momentum, L2 weight decay on every parameter, a step schedule and the lr warm-up.

Caffe updates v = m*v + lr*g, w -= v; PyTorch and optax update v = m*v + g, w -= lr*v. The two agree while
the lr is constant and differ after a drop: Caffe's velocity still carries the old lr for a while. The
'dampened' form v = m*v + (1-m)*lr*g, which the released models' notes warn about, scales the effective lr
by (1-m).

ImageNet's lr was "divided by 10 when the error plateaus": `schedule='plateau'` makes that a rule on the
held-out error, kept in the train state so a resumed run continues it; `schedule='steps'` uses fixed
boundaries instead (e.g. epochs 30, 60, 90) so the two can be compared.
"""

import functools
import re

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

MOMENTUM_STYLES = ('caffe', 'pytorch', 'dampened')
BOUNDARIES_AT = ('steps', 'fractions')
WEIGHT_DECAY_ON = ('all', 'kernels')
SCHEDULES = ('steps', 'plateau')
_BN = re.compile(r'(\w+_)?bn\d*')  # models.py's BatchNorm modules


class Plateau(flax.struct.PyTreeNode):
  drops: jax.Array  # lr divisions made so far (used by schedule='plateau')
  best: jax.Array  # the lowest held-out error so far
  waited: (
    jax.Array
  )  # evaluations since the error last fell more than plateau_threshold below `best`


def initial_plateau() -> Plateau:
  return Plateau(
    jnp.zeros((), jnp.int32), jnp.asarray(np.inf, jnp.float32), jnp.zeros((), jnp.int32)
  )


def plateau_after(opt_config, plateau: Plateau, error: float) -> Plateau:
  """After an evaluation (on the host): `plateau_patience` evaluations in a row without an improvement of more
  than `plateau_threshold` divide the lr (by 1/decay) and restart the count."""
  best, waited, drops = float(plateau.best), int(plateau.waited), int(plateau.drops)
  improved = error < best - opt_config.plateau_threshold
  best, waited = (error, 0) if improved else (best, waited + 1)
  if opt_config.schedule == 'plateau' and waited >= opt_config.plateau_patience:
    drops, waited = drops + 1, 0
  return Plateau(np.int32(drops), np.float32(best), np.int32(waited))


def decay_mask(params, weight_decay_on='all'):
  """Which parameters weight decay reaches. 'all': every learnable blob, as Caffe (Scale layers included)
  and fb.resnet.torch; 'kernels': conv and dense kernels only, not BN scale/bias nor the dense bias."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict(
    {k: weight_decay_on == 'all' or k[-1] == 'kernel' for k in flat}
  )


def bn_mask(params):
  """BatchNorm's scale and bias (the modules stem_bn, bn1..bn3 and proj_bn)."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict(
    {k: len(k) > 1 and bool(_BN.fullmatch(str(k[-2]))) and k[-1] in ('scale', 'bias') for k in flat}
  )


def create(opt_config, freeze_bn=False) -> optax.GradientTransformation:
  """SGD whose learning rate sits in the optimizer state (`opt_state.hyperparams['learning_rate']`).

  `freeze_bn` (model.freeze_bn): BN's scale and bias get zero updates, weight decay included.
  """

  def sgd(learning_rate):
    mask = functools.partial(decay_mask, weight_decay_on=opt_config.weight_decay_on)
    decay = optax.add_decayed_weights(opt_config.weight_decay, mask=mask)  # L2, before momentum
    if opt_config.momentum_style == 'caffe':
      steps = [
        decay,
        optax.scale(learning_rate),
        optax.trace(opt_config.momentum),
        optax.scale(-1.0),
      ]
    elif opt_config.momentum_style == 'dampened':  # v = m*v + (1-m)*lr*g: an lr (1-m) times smaller
      steps = [
        decay,
        optax.scale(learning_rate),
        optax.ema(opt_config.momentum, debias=False),
        optax.scale(-1.0),
      ]
    else:
      steps = [decay, optax.trace(opt_config.momentum), optax.scale(-learning_rate)]
    if freeze_bn:  # last, so that nothing (weight decay, momentum) moves them
      steps.append(optax.masked(optax.set_to_zero(), bn_mask))
    return optax.chain(*steps)

  return optax.inject_hyperparams(sgd)(learning_rate=opt_config.learning_rate)


def resolve_boundaries(opt_config, num_steps: int):
  """A copy of `opt_config` whose `boundaries` are iterations, whichever way the config gives them."""
  resolved = ml_collections.ConfigDict(opt_config.to_dict())
  if opt_config.boundaries_at == 'fractions':
    resolved.boundaries = tuple(int(round(f * num_steps)) for f in opt_config.boundary_fractions)
    resolved.boundaries_at = 'steps'
  return resolved


def learning_rate(opt_config, step, warmup_done, plateau_drops=0):
  """lr x decay per boundary passed (or per plateau), or the warm-up lr until the warm-up is done.

  optax's schedules are functions of the step alone: `join_schedules` switches at a fixed step and
  restarts the next schedule's count there (its 32k drop comes at 32k + the switch step), so neither
  the warm-up's error rule nor the plateau rule is one of them."""
  if opt_config.schedule == 'plateau':
    lr = opt_config.learning_rate * jnp.asarray(opt_config.decay, jnp.float32) ** plateau_drops
  else:
    scales = {}
    for boundary in opt_config.boundaries:  # a repeated boundary decays once per repeat
      scales[boundary] = scales.get(boundary, 1.0) * opt_config.decay
    lr = optax.piecewise_constant_schedule(opt_config.learning_rate, scales)(step)
  return jnp.where(warmup_done, lr, opt_config.warmup_learning_rate).astype(jnp.float32)


def warmup_done_after(opt_config, step, warmup_done, train_error):
  """The paper's ResNet-110 rule: warm up until the training error falls below a threshold, with a step cap."""
  return (
    warmup_done
    | (train_error < opt_config.warmup_error)
    | (step + 1 >= opt_config.warmup_max_steps)
  )


def initial_warmup_done(opt_config):
  return jnp.asarray(not opt_config.warmup_learning_rate > 0)


def set_learning_rate(opt_state, lr):
  return opt_state._replace(hyperparams={**opt_state.hyperparams, 'learning_rate': lr})


def current_learning_rate(opt_state):
  return opt_state.hyperparams['learning_rate']
