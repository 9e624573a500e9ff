from setuptools import find_packages, setup

setup(
    name="llmjax",
    version="0.1.0",
    description="Train and use Transformer language models with JAX and Flax, from a laptop CPU to TPU pods.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["llmjax", "llmjax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "sentencepiece>=0.2",
        "ml-collections>=0.1.1",
        "absl-py>=2.0",
        "numpy>=1.26",
        "tqdm>=4.66",            # progress bar with ETA
        "tensorboardX>=2.6",     # TensorBoard event files without TensorFlow
        "matplotlib>=3.8",       # loss-curve PNG
        "safetensors>=0.4",      # Hugging Face weights (never pickle)
        # python -m llmjax.evaluate: reference BLEU/chrF and ROUGE (tested: 2.6.0, 0.1.2)
        "sacrebleu>=2.3",
        "rouge-score>=0.1.2",
        # chat templates (llmjax/data/chat.py): the sandboxed jinja2 that transformers renders
        # Hugging Face chat templates with; >=3.1.6 as transformers requires (sandbox fixes)
        "jinja2>=3.1.6",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            # the suite runs on 2 workers (pytest.ini): most of its time is single-threaded XLA
            # compilation of tiny models, so 2 cores nearly halve it
            "pytest-xdist>=3.5",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "pyyaml>=6",         # tests parse launch/skypilot.yaml
            # Hugging Face parity tests (tests/test_convert.py); tested with transformers 5.23.0
            "torch==2.13.0",
            "transformers>=5.23,<6",
            "tokenizers>=0.23.1,<0.24",
            "lm-eval>=0.4.13,<0.5",  # tests/test_evaluate_cli.py: the lm-eval adapter
            "scikit-learn>=1.3",     # tests/test_eval_metrics.py: macro-F1 / confusion reference
            "peft>=0.17,<1",         # tests/test_peft.py: LoRA adapters both ways (tested with 0.21.2)
            # Parquet / HF-datasets task files and corpora, .zst corpora, and the SIGKILL test
            "pyarrow>=15", "zstandard>=0.22", "datasets>=2.18", "psutil>=5.9",
            "num2words>=0.5.13",     # tests/test_seq2seq.py: the translate_numbers demo
        ],
        # python -m llmjax.lm_eval: lm-evaluation-harness tasks on a run (tested with 0.4.13)
        "eval": ["lm-eval>=0.4.13,<0.5"],
        # Parquet files and HF `datasets` save_to_disk directories (task data and corpora), .zst
        # corpora; imported only when such an input is given
        "data": ["pyarrow>=15", "datasets>=2.18", "zstandard>=0.22"],
        # Hugging Face import/export: tokenizer.json needs `tokenizers`; loading by hub id needs
        # huggingface_hub. Weights themselves need only safetensors (a core dependency).
        "hf": ["tokenizers>=0.23.1", "huggingface_hub>=1.31"],
        # benchmarks/nanogpt_reference.py: the PyTorch nanoGPT twin timed against llmjax
        "bench": ["torch>=2.1",  # measured with torch 2.13.0 (CPU wheel)
                  "psutil>=5.9"],  # prepare_corpus.py / first_step.py: RSS and CPU of process trees
        # experiments/translate_numbers.py: English/French number words (an offline parallel
        # corpus of any size; issue 11's translation demo)
        "examples": ["num2words>=0.5.13"],
        "gpu": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
    },
    entry_points={"console_scripts": ["llmjax=llmjax.main:run", "llmjax-plan=llmjax.plan:run"]},
)
