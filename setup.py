"""codi-jax: CoDi (Any-to-Any Generation via Composable Diffusion) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="codi-jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of CoDi: any-to-any generation via composable "
                "diffusion, trainable and sharded from one CPU to TPU pods.",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["codi_jax", "codi_jax.*", "configs"]),
    # The tokenizer vocabularies and their licences (`codi_jax.text.vocab_dir`).
    package_data={"codi_jax.text": ["vocab/*"]},
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "grain==0.2.18",
        "tensorflow-datasets==4.9.10",
        # tfds builders locate their code through etils.epath, which imports this without
        # declaring it.
        "importlib-resources==7.1.0",
        "array-record==0.8.6",
        # Media codecs: MP4/H.264 via the FFmpeg libraries in PyAV's wheel, WAV/FLAC via the
        # libsndfile in soundfile's wheel (no system packages).
        "av==18.1.0",
        "soundfile==0.14.0",
        "ml-collections==1.1.0",
        "clu==0.0.12",
        # TensorBoard event files without TensorFlow (clu's own TensorBoard writer needs TF,
        # which would switch tensorflow-datasets onto its TF code paths).
        "tensorboard==2.21.0",
        "absl-py==2.5.1",
        "einops==0.8.2",
        "numpy==2.4.6",
        "pillow==13.0.0",
        "regex==2026.11.19",
        "ftfy==6.1.1",
        "tqdm==4.70.1",
        # Reading and writing weight files without pickles (`codi-jax convert` / `export`).
        "safetensors==0.8.0",
    ],
    extras_require={
        # libtpu, for AOT compilation against TPU topologies from a CPU machine.
        "tpu": ["jax[tpu]==0.10.2"],
        # Conversion to/from the released PyTorch weights and parity against PyTorch models.
        "torch": ["torch==2.13.0"],
        # torch: the .pth reading tests (conversion, refusing pickled code) run, not skip.
        "test": ["pytest==9.2.0", "torch==2.13.0"],
        # benchmarks/unet_vs_diffusers.py: diffusers' PyTorch UNet side by side with ours.
        "bench": ["torch==2.13.0", "diffusers==0.42.1"],
    },
    entry_points={"console_scripts": ["codi-jax=codi_jax.cli:main"]},
)
