"""The file markers of tests/conftest.py (what `make test-fast` leaves out) cover every test
file that starts processes, loads transformers or DeepSpeed, or compiles."""

import os
import re

import conftest

HERE = os.path.dirname(os.path.abspath(__file__))
NEEDS = {
    "distributed": re.compile(r"from _procs import|import _procs|mp\.spawn|init_process_group|deepspeed --"),
    "hf": re.compile(r"^\s*(from transformers|import transformers|pytest\.importorskip\(\"(transformers|deepspeed)\"\))",
                     re.M),
    "build": re.compile(r"_build\.load\(|compile_check|emu_binary|\"gpu_check\.sh\""),
}


def test_markers_cover_the_files():
    missing = []
    for name in sorted(os.listdir(HERE)):
        if not (name.startswith("test_") and name.endswith(".py")) or name == "test_markers.py":
            continue
        text = open(os.path.join(HERE, name)).read()
        stem = name[:-3]
        for marker, pattern in NEEDS.items():
            if pattern.search(text) and stem not in conftest.FILE_MARKERS[marker]:
                missing.append(f"{stem} needs the {marker!r} marker")
    assert not missing, "add to tests/conftest.py FILE_MARKERS: " + "; ".join(missing)


def test_markers_name_existing_files():
    files = {n[:-3] for n in os.listdir(HERE) if n.startswith("test_") and n.endswith(".py")}
    stale = {m: sorted(s - files) for m, s in conftest.FILE_MARKERS.items() if s - files}
    assert not stale, stale
