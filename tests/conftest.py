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


@pytest.fixture
def one_thread():
    """Tiny matmuls on a shared 2-core machine: a second thread only adds synchronisation stalls.
    Modules of tiny-model tests opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
