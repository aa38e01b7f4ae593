from setuptools import find_packages, setup

setup(
    name="seq2seq-distill",
    version="0.1.0",
    description="Distill a fine-tuned BART/T5 teacher into a small, fast student with DeepSpeed.",
    packages=find_packages(include=["distill", "distill.*", "kernels", "kernels.*"]),
    # the native loss row step is compiled from this source at first use (kernels/native.py)
    package_data={"kernels": ["_rowstep.c"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "datasets>=3.0",
        "deepspeed>=0.16",
        "accelerate>=1.1",
        "safetensors>=0.4",
        "numpy>=1.26",
        "tokenizers>=0.20",
        "sentencepiece>=0.2",
        "protobuf>=4",
        "pyyaml>=6",
        "tqdm>=4.66",
        "rouge-score>=0.1.2",
        "sacrebleu>=2.4",
        "matplotlib>=3.8",
    ],
    entry_points={"console_scripts": ["seq2seq-distill=distill.train:main"]},
)
