import os
from pathlib import Path

import pytest

from tests.helpers import write_jsonl

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from alignkit.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_tok():
    from alignkit.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def jsonl(tmp_path):
    def make(name, rows):
        return write_jsonl(tmp_path / name, rows)
    return make
