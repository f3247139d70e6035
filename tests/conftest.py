"""Test switches.

``--triton-device``: where the Triton kernels run in tests.
``-m slow``: also run the tests marked ``slow`` (skipped otherwise).
  ``auto`` (default): on the GPU when there is one, else through Triton's interpreter
  (``TRITON_INTERPRET=1``) on CPU tensors at small shapes; ``interpret``: always the
  interpreter; ``none``: skip the Triton kernel tests.
The environment variable must be set before any Triton kernel is defined, so it is set
here, in ``pytest_configure``, before test modules import ``sft_kernels``.
"""

import os

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption(
        "--triton-device",
        choices=("auto", "interpret", "none"),
        default=os.environ.get("SFT_TRITON_DEVICE", "auto"),
        help="where Triton kernel tests run (see tests/conftest.py)",
    )


def pytest_configure(config):
    mode = config.getoption("--triton-device")
    if mode == "interpret" or (mode == "auto" and not torch.cuda.is_available()):
        os.environ["TRITON_INTERPRET"] = "1"
    config._sft_triton_mode = mode
    if os.environ.get("SFT_KERNELS_TEST_INSTALLED") == "1":
        # scripts/wheel_check.sh: these tests must exercise the installed wheel, not the checkout
        import sft_kernels

        checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.abspath(sft_kernels.__file__).startswith(checkout + os.sep):
            raise pytest.UsageError(f"SFT_KERNELS_TEST_INSTALLED=1 but sft_kernels comes from the checkout "
                                    f"({sft_kernels.__file__}); run pytest from outside it")


def pytest_report_header(config):
    import sft_kernels

    return f"sft_kernels {sft_kernels.__version__} from {os.path.dirname(sft_kernels.__file__)}"


# Which files need more than one process, Hugging Face models or DeepSpeed, or a build: the
# markers of `make test-fast` (-m "not distributed and not hf and not build"), one table
# instead of a line in each file. A new file that starts processes, loads transformers or
# DeepSpeed, or compiles, belongs here (test_markers_cover_the_files checks the imports).
FILE_MARKERS = {
    "distributed": {"test_alst", "test_alst_halo", "test_context_parallel", "test_deepspeed_ops", "test_deepspeed_zero",
                    "test_dschat", "test_dschat_parity", "test_hf_context_parallel", "test_input_errors_parallel",
                    "test_packed_context_parallel", "test_hybrid_context_parallel", "test_trl_sft_alst",
                    "test_input_errors_zero3", "test_tiled_loss_train", "test_train", "test_train_context_parallel", "test_train_dschat",
                    "test_train_inputs", "test_ulysses", "test_tiled_mlp_zero3"},
    "hf": {"test_activation_offload", "test_alst", "test_alst_halo", "test_context_parallel", "test_convergence", "test_deepspeed_ops", "test_deepspeed_zero", "test_dschat", "test_dschat_parity", "test_hf_context_parallel",
           "test_hybrid_context_parallel", "test_trl_sft_alst", "test_hf_matrix", "test_input_errors_hf", "test_memory_bench", "test_input_errors_parallel", "test_input_errors_zero3",
           "test_readme", "test_tiled_loss_hf", "test_tiled_loss_train", "test_train", "test_train_context_parallel", "test_train_dschat",
           "test_train_inputs", "test_transformers_integration", "test_ulysses", "test_tiled_mlp_zero3"},
    "build": {"test_cuda_build", "test_deepspeed_ops", "test_gpu_check", "test_gpu_compile"},
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        stem = os.path.splitext(os.path.basename(str(item.fspath)))[0]
        for marker, stems in FILE_MARKERS.items():
            if stem in stems:
                item.add_marker(getattr(pytest.mark, marker))
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_triton = pytest.mark.skip(reason="--triton-device=none")
    # `slow` tests (thorough property runs) are opt-in: they run when -m selects them
    markexpr = config.getoption("-m") or ""
    run_slow = "slow" in markexpr and "not slow" not in markexpr
    skip_slow = pytest.mark.skip(reason="slow: select with -m slow")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "interpret" in item.keywords and config._sft_triton_mode == "none":
            item.add_marker(skip_triton)


@pytest.fixture(scope="session")
def triton_device():
    """Device for tensors fed to Triton kernels: cuda on a GPU, cpu under the interpreter."""
    return "cuda" if os.environ.get("TRITON_INTERPRET", "0") != "1" and torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
