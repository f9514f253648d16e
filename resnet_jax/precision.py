"""Mixed precision. bfloat16 needs nothing beyond model.dtype (params and optimizer state stay float32);
float16's narrow range underflows small gradients, so float16 training scales the loss up before
differentiating and the gradients down after: dynamically, halving the scale when the gradients overflow
(that step's update is skipped and counted) and doubling it after GROWTH_INTERVAL finite steps.
jmp's DynamicLossScale gives the same scales step for step (compared over a run of finite and
overflowing steps) but counts no skipped steps; flax's DynamicScale doubles one finite step later and
halves below 1 (down to float32's tiny), as its `value_and_grad` source reads.
"""

import flax
import jax
import jax.numpy as jnp

INITIAL_SCALE = 2.0**15
GROWTH_INTERVAL = 2000


class LossScale(flax.struct.PyTreeNode):
  scale: jax.Array  # float32; stays 1 unless the model computes in float16
  good_steps: jax.Array  # finite steps since the scale last changed
  overflow_steps: jax.Array  # steps skipped because the scaled gradients overflowed


def dynamic(model_config) -> bool:
  return jnp.dtype(model_config.dtype) == jnp.float16


def initial(model_config) -> LossScale:
  scale = INITIAL_SCALE if dynamic(model_config) else 1.0
  return LossScale(
    jnp.asarray(scale, jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
  )


def adjust(loss_scale: LossScale, grads_finite) -> LossScale:
  good = jnp.where(grads_finite, loss_scale.good_steps + 1, 0)
  grow = good >= GROWTH_INTERVAL
  scale = jnp.where(
    grads_finite,
    jnp.where(grow & jnp.isfinite(loss_scale.scale * 2), loss_scale.scale * 2, loss_scale.scale),
    jnp.maximum(loss_scale.scale / 2, 1.0),
  )
  return LossScale(
    scale, jnp.where(grow, 0, good), loss_scale.overflow_steps + (~grads_finite).astype(jnp.int32)
  )
