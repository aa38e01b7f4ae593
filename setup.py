from setuptools import find_packages, setup

KERNELS = "seq2seq_distill_kernels"  # the name distill/kernel_ops.py imports

setup(
    name="seq2seq-distill",
    version="0.1.0",
    description="Distill a fine-tuned BART/T5 teacher into a small, fast student with DeepSpeed.",
    # The folder kernels/ installs as the package seq2seq_distill_kernels: the top-level name
    # `kernels` belongs to Hugging Face's hub-kernels package, which transformers imports, and
    # two distributions installing one top-level package overwrite each other's files. From a
    # checkout the folder is still `kernels` (kernels/__init__.py); distill/ uses the installed
    # name (distill/kernel_ops.py).
    packages=find_packages(include=["distill", "distill.*"]) + [KERNELS],
    package_dir={KERNELS: "kernels"},
    # the native loss row step is compiled from this source at first use (kernels/native.py)
    package_data={KERNELS: ["_rowstep.c"]},
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
        "ctranslate2>=4.8.5,<5",  # the demo's served-alike speed (teacher and student in CTranslate2)
    ],
    # --report-to's trackers (distill/tracking.py imports each only when asked for); mlflow-skinny
    # has the client and the file store; the full mlflow adds the UI server.
    # --export-runtime / python -m distill.export_runtime (distill/runtime.py imports each only
    # for its target): CTranslate2, and ONNX Runtime with onnx (its int8 quantizer edits graphs with it).
    extras_require={"tracking": ["tensorboard>=2.14", "wandb>=0.19", "mlflow-skinny>=3.0"],
                    "runtime": ["ctranslate2>=4.8.5,<5", "onnxruntime>=1.20", "onnx>=1.17"]},
    entry_points={"console_scripts": ["seq2seq-distill=distill.train:main"]},
)
