import os

# The Triton kernels run on CPU tensors under the interpreter; it must be set before triton is
# imported. A GPU run (bench/gpu_check.sh) sets TRITON_INTERPRET=0 to compile them for real.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def triton_compiles() -> bool:
    """Whether Triton kernels are compiled for a GPU (TRITON_INTERPRET != 1), not interpreted."""
    return os.environ.get("TRITON_INTERPRET", "0") != "1"


def triton_device() -> torch.device:
    """Where a test puts the tensors it hands to a Triton kernel: CPU under the interpreter
    (TRITON_INTERPRET=1, the CI default), CUDA when Triton compiles for real (a compiled kernel
    cannot read CPU memory: "Pointer argument cannot be accessed from Triton"). Skips the test
    when Triton compiles but there is no GPU."""
    if not triton_compiles():
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip("TRITON_INTERPRET is not 1 (Triton compiles for a GPU) and no CUDA device is present")


@pytest.fixture
def device():
    """Where the kernel tests put their tensors: CUDA when present, else CPU (interpreter; a
    compiling Triton without a GPU skips)."""
    return torch.device("cuda") if torch.cuda.is_available() else triton_device()


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
