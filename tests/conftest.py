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


def pytest_runtest_setup(item):
    """A test that forces ``torch._int_mm`` (parametrized ``cpu_gemm="int_mm"`` or ``way="int_mm"``)
    checks a way bytetune refuses on a CPU where that product is not exact (oneDNN held to AVX2:
    make test-hosts): there it is skipped with the probe's reason, the same verdict as a host
    without the kernel. The refusal itself is tested in tests/kernels/test_cpu_int8_gemm.py."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "int_mm" in (params.get("cpu_gemm"), params.get("way")):
        from bytetune.kernels.cpu_int8_gemm import int_mm_problem

        problem = int_mm_problem()
        if problem:
            pytest.skip(f"torch._int_mm is not usable on this CPU ({problem}); bytetune uses the fp32 way here")
