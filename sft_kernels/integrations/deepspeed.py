"""The kernels as DeepSpeed ops: an op builder, its registration, Ulysses and ZeRO notes.

- :class:`SFTKernelsBuilder` is a DeepSpeed ``CUDAOpBuilder`` for the CUDA extension
  (``sft_kernels/csrc/``). Its sources, include paths and flags are :mod:`sft_kernels._build`'s, so there
  is one definition of the build; the builder adds DeepSpeed's compute capability
  handling (``TORCH_CUDA_ARCH_LIST``, else the visible GPUs when building just in time,
  else the default list of :mod:`sft_kernels._build`; architectures below sm_80 are
  dropped, the kernels use bf16 ``mma.sync`` and ``cp.async``). ``load()`` imports the
  ahead-of-time build ``sft_kernels._C`` when present, else compiles with ninja.
- :func:`register` makes ``get_accelerator().create_op_builder("SFTKernelsBuilder")`` and
  ``get_op_builder("SFTKernelsBuilder")`` return it, on DeepSpeed's CUDA accelerator
  (which keeps a class dictionary) and on every other accelerator, the CPU one included
  (whose lookup is a fixed chain of names, so the instance's lookup is wrapped).
- :func:`compatibility_report` is the ``ds_report``-style line for ``sft-kernels info``.
- Ulysses sequence parallelism: ``SFTAttention(..., sequence_parallel_group=group)`` (see
  :func:`ulysses_group`). Constraints: ``num_heads`` and ``num_kv_heads`` divisible by
  the group size ``P``; every rank holds the same number ``L/P`` of consecutive tokens
  (so ``L % P == 0``); an ``attention_mask`` is passed as the local ``(batch, L/P)`` shard,
  all-gathered inside the layer, and pad rows come out zero as without parallelism.

Importing this module imports deepspeed; ``import sft_kernels`` does not.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from typing import List, Optional, Tuple

import torch

from .. import _build

try:  # DeepSpeed keeps the builders in deepspeed.ops.op_builder (or a top-level op_builder in a source install)
    from deepspeed.ops.op_builder.builder import CUDAOpBuilder
except ImportError:  # pragma: no cover - depends on how deepspeed was installed
    from op_builder.builder import CUDAOpBuilder  # type: ignore

__all__ = ["SFTKernelsBuilder", "compatibility_report", "ds_report", "is_registered", "register", "ulysses_group"]

BUILDER_NAME = "SFTKernelsBuilder"
MIN_COMPUTE_CAPABILITY = (8, 0)  # bf16 mma.sync, cp.async


class SFTKernelsBuilder(CUDAOpBuilder):
    """DeepSpeed op builder for ``sft_kernels``' CUDA extension.

    ``SFTKernelsBuilder().load()`` returns the extension module (API: csrc/binding.cpp):
    ``sft_kernels._C`` when it was built ahead of time (``SFT_KERNELS_BUILD_CUDA=1 pip
    install -e .``, or ``DS_BUILD_SFT_KERNELS=1`` with DeepSpeed's build machinery, which
    reads :meth:`builder`), otherwise a just-in-time ninja build (minutes, once; cached
    in torch's extension directory).
    """

    BUILD_VAR = "DS_BUILD_SFT_KERNELS"
    NAME = "sft_kernels"

    def __init__(self, name: Optional[str] = None):
        super().__init__(name=self.NAME if name is None else name)

    # ---------------------------------------------------------------- what to build
    def absolute_name(self) -> str:
        return _build.AOT_NAME

    def sources(self) -> List[str]:
        return _build.sources()

    def include_paths(self) -> List[str]:
        return _build.include_dirs()

    def extra_ldflags(self) -> List[str]:
        return [f"-L{d}" for d in _build.library_dirs()]

    def cxx_args(self) -> List[str]:
        # DeepSpeed's defaults add -g; ours are _build's (the C++ standard is torch's).
        std = "-std=c++20" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 12) else "-std=c++17"
        return list(_build.CXX_FLAGS) + [std]

    def nvcc_args(self) -> List[str]:
        """_build's nvcc flags plus the architectures (DeepSpeed's compute capability rules).

        Just in time, :meth:`compute_capability_args` sets ``TORCH_CUDA_ARCH_LIST`` (from the
        environment, else the visible GPUs) and returns no flags: torch emits ``-gencode``.
        Ahead of time it returns one ``-gencode`` per architecture.
        """
        return list(_build.NVCC_FLAGS) + self.compute_capability_args()

    def compute_capability_args(self, cross_compile_archs=None) -> List[str]:
        # DeepSpeed's cross-compile default (6.0;6.1;7.0 and up) would be pruned to nothing
        # below; without TORCH_CUDA_ARCH_LIST use _build's list (sm_80, sm_90).
        if not self.jit_mode and cross_compile_archs is None and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            cross_compile_archs = _build.DEFAULT_ARCH_LIST
        return super().compute_capability_args(cross_compile_archs)

    def filter_ccs(self, ccs: List[str]):
        kept, pruned = [], []
        for cc in ccs:
            major, minor = cc.split(".")
            if (int(major), int(minor.split("+")[0])) >= MIN_COMPUTE_CAPABILITY:
                kept.append([major, minor])
            else:
                pruned.append(cc)
        if pruned:
            self.warning(f"{self.NAME}: dropping compute capabilities {pruned}; the kernels need sm_80 or newer")
        return kept

    # ---------------------------------------------------------------- can it build / run
    # DeepSpeed's meaning (ds_report): "compatible" = the system meets the dependencies to
    # JIT-build the op. Whether it can *run* here (a GPU of sm_80 or newer) is a separate
    # question, answered by run_incompatibility().
    def build_incompatibility(self) -> str:
        """'' when the op is installed or can be JIT-built here, else every reason it cannot, joined by '; '."""
        if self.is_installed():
            return ""
        reasons = []
        if torch.version.cuda is None:
            reasons.append(f"torch {torch.__version__} is built without CUDA")
        if not _build._nvcc_available():
            reasons.append(f"{_build.AOT_NAME} is not built and there is no nvcc to build it just in time "
                           "(set CUDA_HOME)")
        if shutil.which("ninja") is None:
            reasons.append(f"{_build.AOT_NAME} is not built and ninja (needed to build it just in time) is missing")
        try:
            self.sources()
        except FileNotFoundError as exc:
            reasons.append(str(exc))
        return "; ".join(reasons)

    def run_incompatibility(self) -> str:
        """'' when a built op can run here, else why not (no GPU, or one older than sm_80)."""
        if not torch.cuda.is_available():
            return "no CUDA device is visible (torch.cuda.is_available() is False)"
        cc = torch.cuda.get_device_capability(0)
        if cc < MIN_COMPUTE_CAPABILITY:
            return f"GPU 0 has compute capability {cc[0]}.{cc[1]}; the kernels need 8.0 or newer"
        return ""

    def incompatibility(self) -> str:
        """Every reason the op cannot be built or cannot run here ('' when it can do both)."""
        return "; ".join(r for r in (self.build_incompatibility(), self.run_incompatibility()) if r)

    def is_compatible(self, verbose: bool = False) -> bool:
        """DeepSpeed's meaning: True when the op is installed or can be JIT-built here. A GPU is
        not needed to build; when it cannot run here the reason is in :meth:`run_incompatibility`
        (and, with ``verbose``, printed as a warning)."""
        why = self.build_incompatibility()
        if why:
            self.error_log = f"{self.NAME} is not compatible: {why}"
            if verbose:
                self.warning(self.error_log)
            return False
        run = self.run_incompatibility()
        if run and verbose:
            self.warning(f"{self.NAME} can be built here but cannot run here: {run}")
        return super().is_compatible(verbose)

    def is_installed(self) -> bool:
        """Whether the ahead-of-time build imports."""
        try:
            importlib.import_module(self.absolute_name())
            return True
        except ImportError:
            return False

    # ---------------------------------------------------------------- load
    def load(self, verbose: bool = False):
        """The extension module: ``sft_kernels._C`` if built ahead of time, else :meth:`jit_load`
        (which finds an earlier just-in-time build in torch's extension cache and only imports it)."""
        if self.name in CUDAOpBuilder._loaded_ops:
            return CUDAOpBuilder._loaded_ops[self.name]
        try:
            module = importlib.import_module(self.absolute_name())
        except ImportError:
            return self.jit_load(verbose)
        CUDAOpBuilder._loaded_ops[self.name] = module
        return module

    def jit_build_directory(self) -> str:
        """Where the just-in-time build lives: torch's extension cache (``TORCH_EXTENSIONS_DIR``,
        default ``~/.cache/torch_extensions/<python>_<cuda>/``), folder ``sft_kernels_C``."""
        from torch.utils.cpp_extension import _get_build_directory

        return _get_build_directory(_build.JIT_NAME, verbose=False)

    def jit_load(self, verbose: bool = True, build_directory: Optional[str] = None):
        """Build with ninja through :func:`sft_kernels._build.load` (minutes, once), or import
        the build an earlier process left in :meth:`jit_build_directory` (ninja finds nothing
        to do). No GPU is needed to build.

        The architecture list is DeepSpeed's: ``TORCH_CUDA_ARCH_LIST`` if set, else the
        compute capabilities of the visible GPUs (+PTX on the newest), else (no GPU)
        :mod:`sft_kernels._build`'s default (sm_80, sm_90).
        """
        if not self.is_compatible(verbose):
            raise RuntimeError(f"Unable to JIT load the {self.name} op: {self.error_log}")
        saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
        self.jit_mode = True
        self._jit_arch_list = (saved or "").strip() or None
        if self._jit_arch_list is None and not torch.cuda.is_available():
            self._jit_arch_list = _build.DEFAULT_ARCH_LIST
        try:
            self.compute_capability_args()  # sets TORCH_CUDA_ARCH_LIST, which _build.load reads
            module = _build.load(build_directory=build_directory, verbose=verbose)
        finally:
            if saved is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = saved
            self._jit_arch_list = None
            self.jit_mode = False
        CUDAOpBuilder._loaded_ops[self.name] = module
        return module


# -------------------------------------------------------------------- registration
def _wrap_lookup(accelerator) -> None:
    """Wrap this accelerator instance's get_op_builder / create_op_builder (once)."""
    if getattr(accelerator, "_sft_kernels_wrapped", False):
        return
    get_orig = accelerator.get_op_builder
    create_orig = accelerator.create_op_builder

    def get_op_builder(class_name):
        return SFTKernelsBuilder if class_name == BUILDER_NAME else get_orig(class_name)

    def create_op_builder(class_name):
        return SFTKernelsBuilder() if class_name == BUILDER_NAME else create_orig(class_name)

    accelerator.get_op_builder = get_op_builder
    accelerator.create_op_builder = create_op_builder
    accelerator._sft_kernels_wrapped = True


def register(accelerator=None) -> type:
    """Make DeepSpeed's op lookup know ``SFTKernelsBuilder``; idempotent; returns the class.

    After it, ``get_accelerator().create_op_builder("SFTKernelsBuilder")`` builds one,
    ``get_accelerator().get_op_builder("SFTKernelsBuilder")`` is the class, and
    ``from deepspeed.ops.op_builder import SFTKernelsBuilder`` works. Registers on
    ``accelerator`` (default: ``deepspeed.accelerator.get_accelerator()``); call it again
    after ``set_accelerator``.

    The CUDA accelerator finds builders in a class dictionary filled from the modules of
    its ``op_builder_dir``: the class is added there. The CPU accelerator (and others)
    resolve names through a fixed chain that ends in ``NotImplementedBuilder``: the
    instance's lookup methods are wrapped.
    """
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    if hasattr(accelerator, "_lazy_init_class_dict"):
        accelerator._lazy_init_class_dict()
        if isinstance(getattr(accelerator, "class_dict", None), dict):
            accelerator.class_dict[BUILDER_NAME] = SFTKernelsBuilder
    _wrap_lookup(accelerator)
    for mod_name in (accelerator.op_builder_dir(), "deepspeed.ops.op_builder"):
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        setattr(mod, BUILDER_NAME, SFTKernelsBuilder)
    return SFTKernelsBuilder


def is_registered(accelerator=None) -> bool:
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    return accelerator.get_op_builder(BUILDER_NAME) is SFTKernelsBuilder


def compatibility_report() -> str:
    """One ``ds_report``-style line, ``SFTKernelsBuilder (sft_kernels) ...... installed [YES|NO] ......
    compatible [OKAY|NO]``, compatible in DeepSpeed's sense (can be JIT-built here), then why not,
    and whether it can run here."""
    builder = SFTKernelsBuilder()
    installed = "[YES]" if builder.is_installed() else "[NO]"
    build_why, run_why = builder.build_incompatibility(), builder.run_incompatibility()
    compatible = "[OKAY]" if not build_why else "[NO]"
    line = f"{BUILDER_NAME} ({builder.NAME}) {'.' * 6} installed {installed} {'.' * 6} compatible {compatible}"
    notes = []
    if build_why:
        notes.append(f"cannot be built: {build_why}")
    elif not builder.is_installed():
        notes.append("JIT-built on first load()")
    notes.append(f"cannot run here: {run_why}" if run_why else "runs here")
    return line + " (" + "; ".join(notes) + ")"


def ds_report(argv: Optional[List[str]] = None) -> int:
    """DeepSpeed's ``ds_report`` with this package's op among DeepSpeed's own.

    ``ds_report`` lists the builders it finds in DeepSpeed's ``op_builder`` package, which an
    outside package cannot join without writing into DeepSpeed's install; this runs the same
    report after adding ``sft_kernels`` to its op table (``installed`` = the ahead-of-time
    build imports; ``compatible`` = it can be JIT-built here), then prints
    :func:`compatibility_report`'s line with the reasons. ``sft-kernels ds_report`` and
    ``python -m sft_kernels.integrations.deepspeed`` call it.
    """
    register()
    from deepspeed import env_report, git_version_info
    from deepspeed.ops.op_builder import all_ops

    builder = SFTKernelsBuilder()
    all_ops.ALL_OPS[builder.name] = builder  # env_report holds the same dict
    git_version_info.installed_ops[builder.name] = builder.is_installed()
    sys_argv = sys.argv
    try:
        sys.argv = ["ds_report"] + list(argv or [])
        env_report.cli_main()
    finally:
        sys.argv = sys_argv
    print(compatibility_report())
    return 0


# -------------------------------------------------------------------- Ulysses
def ulysses_group(sequence_parallel_size: int) -> Tuple[object, int]:
    """Split the world into consecutive groups of ``sequence_parallel_size`` ranks.

    Returns ``(group, data_parallel_rank)``: this rank's sequence parallel group (pass it
    as ``SFTAttention(..., sequence_parallel_group=group)``) and the index of that group
    (ranks of one group share a data-parallel batch). Every rank must call it (group
    creation is collective). ``world_size % sequence_parallel_size == 0``.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError("ulysses_group: initialise torch.distributed first (deepspeed.init_distributed())")
    world, rank = dist.get_world_size(), dist.get_rank()
    sp = int(sequence_parallel_size)
    if sp < 1 or world % sp != 0:
        raise ValueError(
            f"ulysses_group: sequence_parallel_size={sequence_parallel_size} must be a positive divisor of the "
            f"world size {world}"
        )
    mine = None
    for start in range(0, world, sp):
        g = dist.new_group(list(range(start, start + sp)))
        if start <= rank < start + sp:
            mine = g
    return mine, rank // sp


if __name__ == "__main__":
    sys.exit(ds_report(sys.argv[1:]))
