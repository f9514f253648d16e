"""Deep residual networks (He et al., CVPR 2016) in JAX/Flax."""
