"""A convolution whose backward pass XLA:CPU runs fast inside a loop (nn.scan over blocks).

Outside loops XLA:CPU rewrites a convolution's two gradients into its fast NHWC/HWIO form with explicit
transposes. Inside a while loop it does not: the input gradient keeps autodiff's swapped kernel axes and
the filter gradient its batch-as-feature labels, and both fall to a slow generic path. Measured on 2 cores, a
scanned ResNet-110 training step took 2.8 s at batch 8 and 95 s at batch 128 (unrolled: 0.17 s and 4 s), and
ResNet-1202 29 s at batch 8. This convolution states both gradients in the fast form itself: 0.27 s, 5.6 s
and 3 s, with the same numbers as autodiff's (tests/test_loop_conv.py).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  precision=None,
  **kwargs,
):
  """lax.conv_general_dilated, as nn.Conv's `conv_general_dilated`; the explicit backward for stride-1,
  undilated, ungrouped NHWC convolutions (all of a scanned block's), lax's own for anything else."""
  plain = (
    lhs.ndim == 4
    and tuple(window_strides) == (1, 1)
    and set(lhs_dilation or (1,)) == {1}
    and set(rhs_dilation or (1,)) == {1}
    and feature_group_count == 1
    and not kwargs
    and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  )
  if not plain:
    return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      precision=precision,
      **kwargs,
    )
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  return _conv(_vary_like(lhs, rhs), _vary_like(rhs, lhs), padding, precision)


def _varying(x):
  aval = jax.typeof(x)
  kind = getattr(aval, 'manual_axis_type', None)
  return kind.varying if kind is not None else getattr(aval, 'vma', frozenset())


def _vary_like(a, b):
  """`a`, cast to vary over the shard_map axes that `b` varies over, as lax does for its own ops: the
  replicated kernel's gradient is then summed over devices by that cast's transpose, outside _conv."""
  extra = tuple(sorted(_varying(b) - _varying(a)))
  if not extra:
    return a
  return lax.pcast(a, extra, to='varying') if hasattr(lax, 'pcast') else lax.pvary(a, extra)


def _forward(x, w, padding, precision):
  return lax.conv_general_dilated(
    x, w, (1, 1), padding, dimension_numbers=_NHWC, precision=precision
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, padding, precision):
  return _forward(x, w, padding, precision)


def _conv_fwd(x, w, padding, precision):
  return _forward(x, w, padding, precision), (x, w)


def _conv_bwd(padding, precision, residuals, dy):
  x, w = residuals
  kernel = w.shape[:2]
  # Input gradient: dy convolved with the spatially flipped kernel, its in/out axes swapped (HWIO again),
  # padded so that the output has x's size.
  flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  dx_padding = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel, padding))
  dx = _forward(dy, flipped, dx_padding, precision)
  # Filter gradient: the batch is the contracted axis. x as [Cin, H, W, N] (Cin in the batch slot), dy as
  # an [Ho, Wo, N, Cout] "kernel": the output [Cin, kh, kw, Cout] is the kernel's gradient, transposed.
  dw = _forward(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), padding, precision)
  return dx.astype(x.dtype), dw.transpose(1, 2, 0, 3).astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)
