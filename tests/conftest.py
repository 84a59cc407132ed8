"""Shared fixtures: real and tiny models, built locally and cached; nothing comes from a hub.

Built assets live in ``<repo>/.cache/turntune`` (git-ignored) unless ``TURNTUNE_CACHE`` is set:
the SmolLM2 conversion takes about a minute once, every later session reuses it.
"""
from __future__ import annotations

import os
from pathlib import Path

# Set before transformers is imported anywhere: these are read at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("TURNTUNE_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "turntune"))

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from turntune import assets  # noqa: E402

# Property tests draw the same cases on every run (a failure reproduces; the suite's time and the
# case counts quoted in docs stay fixed) and keep no example database. Tests that set their own
# ``@settings`` inherit this.
settings.register_profile("turntune", derandomize=True, database=None)
settings.load_profile("turntune")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Folder of the real SmolLM2-135M-Instruct (float32, converted from the packaged GGUF)."""
    return assets.smollm2_dir()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path: Path):
    """SmolLM2's tokenizer (ChatML template with a default system prompt). Do not mutate it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="session")
def glm4_tokenizer_path() -> Path:
    """Folder of the GLM-4-style tokenizer (special tokens at glm-4-9b-chat's ids)."""
    return assets.glm4_tokenizer_dir()


@pytest.fixture(scope="session")
def glm4_tokenizer(glm4_tokenizer_path: Path):
    """The GLM-4-style tokenizer, loaded once per session. Do not mutate it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(glm4_tokenizer_path)


@pytest.fixture(scope="session")
def tiny_glm_path(glm4_tokenizer_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random ``GlmForCausalLM`` (vocab 151552, hidden 64, 2 layers) with the GLM-4 tokenizer."""
    return assets.tiny_model_dir("glm", glm4_tokenizer_path, tmp_path_factory.mktemp("tiny-glm"))


@pytest.fixture(scope="session")
def tiny_llama_path(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random ``LlamaForCausalLM`` (vocab 49152, hidden 64, 2 layers) with SmolLM2's tokenizer."""
    return assets.tiny_model_dir("llama", smollm2_path, tmp_path_factory.mktemp("tiny-llama"))
