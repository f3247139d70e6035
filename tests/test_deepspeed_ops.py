"""SFTKernelsBuilder: DeepSpeed's op lookup finds it (CPU and CUDA accelerators); compatible
in DeepSpeed's sense (it can be JIT-built here) with a separate reason when it cannot run
here; it builds just in time without a GPU and a new process finds that build; ds_report
(through ``sft-kernels ds_report``) lists it; its build is _build's (one definition of
sources and flags)."""

import json
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
    """Run ``code`` in a fresh interpreter (DeepSpeed picks its accelerator once per process),
    waited on while it makes progress (tests/_procs.py)."""
    from _procs import Group

    full_env = dict(os.environ, PYTHONPATH=ROOT, **env)
    g = Group([[sys.executable, "-c", textwrap.dedent(code)]], [full_env], merge_stderr=False)
    assert g.wait() == [0], g.report()
    return g.output(0)


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


def _can_jit_build() -> bool:
    import shutil

    return torch.version.cuda is not None and _build._nvcc_available() and shutil.which("ninja") is not None


@pytest.mark.skipif(torch.cuda.is_available() or not _can_jit_build(),
                    reason="checks a machine that can build the op but has no GPU to run it")
def test_compatible_means_buildable_and_the_run_reason_is_separate(builder, capsys):
    """DeepSpeed's meaning of compatible (ds_report: "meet the required dependencies to JIT install
    the op"): true here, where nvcc and ninja are, though no GPU can run the op."""
    assert builder.is_compatible(verbose=True) is True
    assert builder.build_incompatibility() == ""
    assert "no CUDA device" in builder.run_incompatibility()
    assert "can be built here but cannot run here: no CUDA device" in capsys.readouterr().out


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
    if _can_jit_build():
        assert "compatible [OKAY]" in line
    if not torch.cuda.is_available():
        assert "cannot run here: no CUDA device" in line


def test_ds_report_lists_the_op_among_deepspeeds():
    exe = os.path.join(os.path.dirname(sys.executable), "sft-kernels")
    cmd = [exe, "ds_report"] if os.path.exists(exe) else [sys.executable, "-m", "sft_kernels.integrations.deepspeed"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    row = next(line for line in lines if line.startswith("sft_kernels ...."))
    assert "[NO]" in row or "[YES]" in row
    assert ("[OKAY]" in row) == _can_jit_build(), row
    assert "cpu_adam" in r.stdout or "fused_adam" in r.stdout  # DeepSpeed's own ops in the same table
    assert lines.index(row) < next(i for i, line in enumerate(lines) if "general environment info" in line)
    assert any(line.startswith("SFTKernelsBuilder (sft_kernels)") for line in lines)


@pytest.mark.skipif(not _can_jit_build(), reason="needs nvcc, ninja and a CUDA build of torch")
def test_jit_build_without_gpu_and_a_new_process_finds_it(tmp_path):
    """load() builds just in time (no GPU needed to build), and a later process's load()
    imports that build from torch's extension cache without compiling again. One
    architecture (sm_90) keeps the build to about a minute on 2 cores."""
    from _procs import Group

    code = textwrap.dedent("""
        import json, sys
        from sft_kernels.integrations.deepspeed import SFTKernelsBuilder
        b = SFTKernelsBuilder()
        m = b.load(verbose=False)
        assert b.load() is m
        json.dump({"file": m.__file__, "dir": b.jit_build_directory(), "has_swa": hasattr(m, "swa_fwd") or
                   len([n for n in dir(m) if not n.startswith("_")]) > 0}, open(sys.argv[1], "w"))
    """)
    env = dict(os.environ, PYTHONPATH=ROOT, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), TORCH_CUDA_ARCH_LIST="9.0",
               DS_ACCELERATOR="cpu")
    env.pop("SFT_KERNELS_JIT", None)
    results = []
    for i in range(2):
        out = tmp_path / f"load{i}.json"
        g = Group([[sys.executable, "-c", code, str(out)]], [env])
        assert g.wait() == [0], g.report()
        results.append(json.loads(out.read_text()))
        if i == 0:
            so = results[0]["file"]
            ninja_log = os.path.join(os.path.dirname(so), ".ninja_log")
            built = (os.stat(so).st_mtime_ns, open(ninja_log).read())
    assert results[0]["file"] == results[1]["file"] and results[0]["file"].startswith(str(tmp_path / "ext"))
    assert results[0]["dir"] == os.path.dirname(results[0]["file"]) and results[0]["has_swa"]
    assert (os.stat(so).st_mtime_ns, open(ninja_log).read()) == built, "the second load compiled again"


@pytest.mark.gpu
def test_load_on_gpu_returns_the_extension(builder):
    ext = builder.load(verbose=False)
    assert builder.load() is ext  # cached
    assert hasattr(ext, "__file__")
