"""SFTKernelsBuilder: DeepSpeed's op lookup finds it (CPU and CUDA accelerators), it explains
why it is not compatible, and its build is _build's (one definition of sources and flags)."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("deepspeed")

import torch  # noqa: E402

from sft_kernels import _build  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, **env) -> str:
    """Run ``code`` in a fresh interpreter (DeepSpeed picks its accelerator once per process)."""
    full_env = dict(os.environ, PYTHONPATH=ROOT, **env)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_import_sft_kernels_does_not_import_deepspeed():
    out = _run("import sys, sft_kernels; print('deepspeed' in sys.modules)")
    assert out.strip() == "False"


def test_lookup_on_cpu_accelerator():
    out = _run(
        """
        from deepspeed.accelerator import get_accelerator
        acc = get_accelerator()
        assert acc._name == "cpu", acc._name
        before = acc.get_op_builder("SFTKernelsBuilder").__name__
        from sft_kernels.integrations.deepspeed import SFTKernelsBuilder, register, is_registered
        assert register() is SFTKernelsBuilder and register() is SFTKernelsBuilder  # idempotent
        assert acc.get_op_builder("SFTKernelsBuilder") is SFTKernelsBuilder
        b = acc.create_op_builder("SFTKernelsBuilder")
        assert type(b) is SFTKernelsBuilder and b.name == "sft_kernels"
        assert is_registered()
        # the accelerator's own builders still resolve
        assert acc.get_op_builder("CPUAdamBuilder").__name__ == "CPUAdamBuilder"
        from deepspeed.ops.op_builder import SFTKernelsBuilder as FromModule
        assert FromModule is SFTKernelsBuilder
        print(before)
        """,
        DS_ACCELERATOR="cpu",
    )
    assert out.strip().splitlines()[-1] == "NotImplementedBuilder"  # DeepSpeed alone does not know it


def test_lookup_on_cuda_accelerator_class_dict():
    # DeepSpeed's CUDA accelerator, constructed directly (no GPU needed to look builders up)
    _run(
        """
        from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator
        acc = CUDA_Accelerator()
        assert acc.get_op_builder("SFTKernelsBuilder") is None
        from sft_kernels.integrations.deepspeed import SFTKernelsBuilder, register
        register(acc)
        assert acc.class_dict["SFTKernelsBuilder"] is SFTKernelsBuilder
        assert acc.get_op_builder("SFTKernelsBuilder") is SFTKernelsBuilder
        assert type(acc.create_op_builder("SFTKernelsBuilder")) is SFTKernelsBuilder
        assert acc.get_op_builder("FusedAdamBuilder").__name__ == "FusedAdamBuilder"
        """
    )


@pytest.fixture()
def builder():
    from sft_kernels.integrations.deepspeed import SFTKernelsBuilder

    return SFTKernelsBuilder()


def test_builder_identity(builder):
    from deepspeed.ops.op_builder.builder import CUDAOpBuilder

    assert isinstance(builder, CUDAOpBuilder)
    assert builder.BUILD_VAR == "DS_BUILD_SFT_KERNELS"
    assert builder.NAME == builder.name == "sft_kernels"
    assert builder.absolute_name() == _build.AOT_NAME == "sft_kernels._C"


def test_builder_uses_the_one_build_definition(builder):
    assert builder.sources() == _build.sources()
    assert any(s.endswith(".cu") for s in builder.sources()) and all(os.path.exists(s) for s in builder.sources())
    assert builder.include_paths() == _build.include_dirs()
    assert builder.cxx_args()[: len(_build.CXX_FLAGS)] == _build.CXX_FLAGS


@pytest.mark.parametrize(
    "arch_list, expected",
    [
        (None, ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                "-gencode=arch=compute_90,code=compute_90"]),  # _build.DEFAULT_ARCH_LIST: +PTX on sm_90
        ("9.0", ["-gencode=arch=compute_90,code=sm_90"]),
        ("8.0;9.0+PTX", ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                         "-gencode=arch=compute_90,code=compute_90"]),
        ("7.0;8.6", ["-gencode=arch=compute_86,code=sm_86"]),  # pre-Ampere pruned
    ],
    ids=["default", "sm90", "ptx", "prune-sm70"],
)
def test_nvcc_args_architectures(builder, monkeypatch, arch_list, expected):
    if arch_list is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    args = builder.nvcc_args()
    assert args[: len(_build.NVCC_FLAGS)] == _build.NVCC_FLAGS
    assert [a for a in args if a.startswith("-gencode")] == expected


def test_nvcc_args_jit_mode_uses_visible_gpu_or_env(builder, monkeypatch):
    # Just in time, DeepSpeed hands the arch list to torch through TORCH_CUDA_ARCH_LIST (+PTX on the newest)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    builder.jit_mode = True
    assert [a for a in builder.nvcc_args() if a.startswith("-gencode")] == []
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0+PTX"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the explanation given without a GPU")
def test_is_compatible_explains_itself_without_gpu(builder, capsys):
    assert builder.is_compatible(verbose=True) is False
    assert "no CUDA device" in builder.error_log
    assert "no CUDA device" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="no CUDA device"):
        builder.jit_load(verbose=False)


def test_is_compatible_names_missing_nvcc(builder, monkeypatch):
    monkeypatch.setattr(_build, "_nvcc_available", lambda: False)
    monkeypatch.setattr(type(builder), "is_installed", lambda self: False)
    assert builder.is_compatible() is False
    assert "no nvcc" in builder.error_log


def test_is_compatible_names_torch_without_cuda(builder, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert builder.is_compatible() is False
    assert "built without CUDA" in builder.error_log


def test_compatibility_report_line():
    from sft_kernels.integrations.deepspeed import compatibility_report

    line = compatibility_report()
    assert line.startswith("SFTKernelsBuilder (sft_kernels) ")
    assert "installed [" in line and "compatible [" in line
    if not torch.cuda.is_available():
        assert "compatible [NO] (" in line and "no CUDA device" in line


@pytest.mark.gpu
def test_load_on_gpu_returns_the_extension(builder):
    ext = builder.load(verbose=False)
    assert builder.load() is ext  # cached
    assert hasattr(ext, "__file__")
