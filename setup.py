"""jaxdream: DreamBooth fine-tuning and sampling for Stable Diffusion, and a vision-language model, in JAX."""

from setuptools import find_packages, setup

setup(
    name='jaxdream',
    version='0.1.0',
    description='Pure-JAX DreamBooth personalisation of Stable Diffusion, with Flax NNX model ports',
    long_description=open('README.md').read() if __import__('os').path.exists('README.md') else '',
    long_description_content_type='text/markdown',
    python_requires='>=3.11',
    packages=find_packages(include=['jaxdream', 'jaxdream.*']),
    package_data={'jaxdream': ['assets/*', 'assets/**/*']},
    install_requires=[
        'jax>=0.10',
        'flax>=0.12',
        'optax',
        'orbax-checkpoint',
        'ml-collections',
        'absl-py',
        'transformers>=4.40',  # tokenizers and configs only; jaxdream never imports torch at run time
        'tokenizers',
        'tensorflow-datasets',
        'importlib_resources',  # tfds needs it for builders defined outside its own package
        'array_record',
        'tensorboardX',
        'grain',
        'safetensors',
        'numpy',
        'pillow',
        'tqdm',
        'ml-dtypes',
    ],
    extras_require={
        # Numerical references only: the CPU build of torch (never a CUDA one on CI machines).
        'test': ['pytest', 'torch==2.13.0', 'diffusers>=0.35', 'transformers>=4.40'],
        'gpu': ['jax[cuda12]'],
        'tpu': ['jax[tpu]'],
    },
    entry_points={'console_scripts': ['jaxdream=jaxdream.cli:main']},
)
