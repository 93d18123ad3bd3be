import os
import sys
from pathlib import Path

import pytest
import torch

# Make tests/ importable as plain modules (paths.py, checkpoints.py, ...) without a package.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoints import write_official  # noqa: E402
from paths import FIXTURES, parity_dir  # noqa: E402
from tokenizer_utils import make_tiny_tokenizer  # noqa: E402


class OfficialCheckpoints:
    """keys file name -> an official-format checkpoint built from it with the deterministic weights.

    Looked up in the parity folder first, then in the project's fixtures; each is built once per session.
    The files are large (Tiny 1.3 GB, Large 3.2 GB: full XLM-R text towers), so `release` deletes one
    once its last test is done, and the session deletes the rest: pytest keeps the temporary folders
    of its last three runs, and CI runs on the machine that ran them.
    """

    def __init__(self, tmp_path_factory):
        self._tmp = tmp_path_factory
        self._built: dict[str, Path] = {}

    def __call__(self, keys_name: str) -> Path:
        if keys_name not in self._built:
            src = parity_dir() / keys_name
            src = src if src.exists() else FIXTURES / keys_name
            out = self._tmp.mktemp("ckpt") / (Path(keys_name).stem.replace("keys_", "wedetect_") + ".pth")
            self._built[keys_name] = write_official(src, out)
        return self._built[keys_name]

    def release(self, keys_name: str) -> None:
        path = self._built.pop(keys_name, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def release_all(self) -> None:
        for name in list(self._built):
            self.release(name)


@pytest.fixture(scope="session")
def official_checkpoint(tmp_path_factory):
    checkpoints = OfficialCheckpoints(tmp_path_factory)
    yield checkpoints
    checkpoints.release_all()


@pytest.fixture(scope="session")
def parity_device():
    """Device of the detector / Uni parity runs: ``WEDETECT_TEST_DEVICE`` (default ``cpu``).

    On CUDA, TensorFloat-32 is switched off for the session (PyTorch lets cuDNN use it for float32
    convolutions by default), so the float32 path is compared as float32 at the parity tolerances.
    """
    device = os.environ.get("WEDETECT_TEST_DEVICE", "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"WEDETECT_TEST_DEVICE={device}, but CUDA is not available")
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield device
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


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
