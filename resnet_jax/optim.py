"""SGD as the paper ran it: Caffe momentum, L2 weight decay on kernels, a step schedule and the lr warm-up.

Caffe updates v = m*v + lr*g, w -= v; PyTorch and optax update v = m*v + g, w -= lr*v. The two agree while
the lr is constant and differ after a drop: Caffe's velocity still carries the old lr for a while. The
'dampened' form v = m*v + (1-m)*lr*g, which the released models' notes warn about, scales the effective lr
by (1-m).
"""
import flax
import jax.numpy as jnp
import optax

MOMENTUM_STYLES = ('caffe', 'pytorch', 'dampened')


def decay_mask(params):
  """Weight decay on conv and dense kernels only (not BN scale/bias, not the dense bias)."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({k: k[-1] == 'kernel' for k in flat})


def create(opt_config) -> optax.GradientTransformation:
  """SGD whose learning rate sits in the optimizer state (`opt_state.hyperparams['learning_rate']`)."""
  if opt_config.momentum_style not in MOMENTUM_STYLES:
    raise ValueError(f'Unknown momentum_style {opt_config.momentum_style!r}: use one of {MOMENTUM_STYLES}.')

  def sgd(learning_rate):
    decay = optax.add_decayed_weights(opt_config.weight_decay, mask=decay_mask)  # Caffe's L2, before momentum
    if opt_config.momentum_style == 'caffe':
      return optax.chain(decay, optax.scale(learning_rate), optax.trace(opt_config.momentum), optax.scale(-1.0))
    if opt_config.momentum_style == 'dampened':  # v = m*v + (1-m)*lr*g: an lr (1-m) times smaller
      return optax.chain(decay, optax.scale(learning_rate), optax.ema(opt_config.momentum, debias=False),
                         optax.scale(-1.0))
    return optax.chain(decay, optax.trace(opt_config.momentum), optax.scale(-learning_rate))

  return optax.inject_hyperparams(sgd)(learning_rate=opt_config.learning_rate)


def learning_rate(opt_config, step, warmup_done):
  """The step schedule (lr x decay at each boundary passed), or the warm-up lr until the warm-up is done."""
  drops = sum((step >= b).astype(jnp.int32) for b in opt_config.boundaries) if opt_config.boundaries else 0
  lr = opt_config.learning_rate * jnp.asarray(opt_config.decay, jnp.float32) ** drops
  return jnp.where(warmup_done, lr, opt_config.warmup_learning_rate).astype(jnp.float32)


def warmup_done_after(opt_config, step, warmup_done, train_error):
  """The paper's ResNet-110 rule: warm up until the training error falls below a threshold, with a step cap."""
  return warmup_done | (train_error < opt_config.warmup_error) | (step + 1 >= opt_config.warmup_max_steps)


def initial_warmup_done(opt_config):
  return jnp.asarray(not opt_config.warmup_learning_rate > 0)


def set_learning_rate(opt_state, lr):
  return opt_state._replace(hyperparams={**opt_state.hyperparams, 'learning_rate': lr})


def current_learning_rate(opt_state):
  return opt_state.hyperparams['learning_rate']

