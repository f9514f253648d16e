"""resnet_jax: the networks, recipes and figures of He et al., "Deep Residual Learning" (CVPR 2016), in JAX."""
import setuptools

setuptools.setup(
    name='resnet_jax',
    version='0.1.0',
    description='Reproduce "Deep Residual Learning for Image Recognition" with JAX and Flax.',
    packages=['resnet_jax', 'configs'],
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.10.2',
        'flax>=0.12.8',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12.8',
        'clu==0.0.12',
        'ml_collections>=1.1.0',
        'tensorflow-cpu>=2.21',
        'tensorflow-datasets>=4.9.10',
        'tensorboard',
        'importlib_resources',
        'pillow',
    ],
    extras_require={
        'test': ['pytest', 'matplotlib', 'nbformat', 'nbclient', 'ipykernel'],
        'bench': ['torch'],  # experiments/benchmark.py's PyTorch twin
    },
)
