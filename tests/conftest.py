import sys
from pathlib import Path

import pytest

# Make tests/ importable as plain modules (paths.py, checkpoints.py, ...) without a package.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoints import write_official  # noqa: E402
from paths import FIXTURES, parity_dir  # noqa: E402
from tokenizer_utils import make_tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def official_checkpoint(tmp_path_factory):
    """keys file name -> an official-format checkpoint built from it with the deterministic weights.

    Looked up in the parity folder first, then in the project's fixtures; each is built once per session.
    """
    built: dict[str, Path] = {}

    def get(keys_name: str) -> Path:
        if keys_name not in built:
            src = parity_dir() / keys_name
            src = src if src.exists() else FIXTURES / keys_name
            out = tmp_path_factory.mktemp("ckpt") / (Path(keys_name).stem.replace("keys_", "wedetect_") + ".pth")
            built[keys_name] = write_official(src, out)
        return built[keys_name]

    return get


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """Path of a small XLM-R-style tokenizer.json (real XLM-R files are not available offline)."""
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="session")
def demo_image() -> Path:
    return FIXTURES / "demo.jpeg"


@pytest.fixture(scope="session")
def shapes_image() -> Path:
    return FIXTURES / "shapes_300x200.png"


@pytest.fixture(scope="session", autouse=True)
def _stop_milvus_lite_servers():
    """Stop Milvus Lite servers while pytest's streams are open (its exit hook logs to closed ones)."""
    yield
    manager = sys.modules.get("milvus_lite.server_manager")
    if manager is not None:
        manager.server_manager_instance.release_all()
