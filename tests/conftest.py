import os

# The Triton kernels run on CPU tensors under the interpreter; it must be set before triton is
# imported. A GPU run (bench/gpu_check.sh) sets TRITON_INTERPRET=0 to compile them for real.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device():
    """Where the kernel tests put their tensors: CUDA when present, else CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
