"""Every entry point starts from the repository root, and nothing in the repository shadows an installed package.

Python puts a script's own folder first on `sys.path`, so a module or package folder beside an entry point (or at
the root, for the root scripts) wins over an installed distribution of the same import name. transformers >= 5
imports PyPI's `kernels`, which a top-level `kernels/` folder once shadowed: every entry point crashed at import.
"""

import importlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

ENTRY_POINTS = [
    "train.py", "sample.py", "compare.py", "analyze.py", "eval/score.py",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "bench").glob("*.py")),
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "scripts").glob("*.py")),
]
# Import names of the ecosystem this toolkit lives in that a user may have installed even where this test's
# environment lacks them (the names of every installed distribution are checked too).
ECOSYSTEM = {"kernels", "evaluate", "eval", "datasets", "transformers", "diffusers", "accelerate", "tokenizers",
             "peft", "safetensors", "huggingface_hub", "timm", "torch", "torchvision", "triton", "hydra",
             "omegaconf", "wandb", "tensorboard", "mlflow", "torch_fidelity", "open_clip", "clip", "einops",
             "xformers", "bitsandbytes", "deepspeed", "sklearn", "numpy", "scipy", "PIL", "tqdm", "matplotlib"}


def test_every_entry_point_is_listed():
    for name in ENTRY_POINTS:
        assert (ROOT / name).is_file(), name


def test_nothing_beside_an_entry_point_takes_an_installed_import_name():
    taken = set(importlib.metadata.packages_distributions()) | ECOSYSTEM
    own = {"uvit_cog"}  # this project's own package
    folders = {(ROOT / e).parent for e in ENTRY_POINTS}
    clashes = []
    for folder in folders:
        for path in folder.iterdir():
            # A module, or a regular package (a folder with __init__.py): both win over site-packages. A folder
            # without __init__.py is a namespace portion, which never hides a regular package.
            if path.suffix == ".py":
                name = path.stem
            elif path.is_dir() and (path / "__init__.py").is_file():
                name = path.name
            else:
                continue
            if name in taken and name not in own:
                clashes.append(str(path.relative_to(ROOT)))
    assert not clashes, f"these shadow installed packages when an entry point runs: {clashes}"


# Runs each script of one folder in turn, as `python folder/script.py --help` would: the folder first on sys.path.
RUN_HELP = """
import runpy, sys
folder, scripts = sys.argv[1], sys.argv[2:]
sys.path[0] = folder
for script in scripts:
    sys.argv = [script, "--help"]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    print("OK", script, flush=True)
"""


def test_every_entry_point_starts_from_the_repository_root():
    """`--help` of each entry point run from the root with transformers installed: the import chain
    diffusers -> transformers -> kernels must resolve to site-packages. One process per script folder (a folder's
    scripts share sys.path[0], so running them in one process changes nothing that could shadow a package)."""
    importlib.metadata.version("transformers")  # a dependency: its absence is a broken install, not a skip
    by_folder: dict[str, list[str]] = {}
    for name in ENTRY_POINTS:
        by_folder.setdefault(str((ROOT / name).parent), []).append(name)
    procs = {folder: subprocess.Popen([sys.executable, "-c", RUN_HELP, folder, *scripts], cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for folder, scripts in by_folder.items()}
    outputs = {folder: proc.communicate(timeout=300)[0] for folder, proc in procs.items()}
    for folder, scripts in by_folder.items():
        for script in scripts:
            assert f"OK {script}" in outputs[folder], f"{script} did not start:\n{outputs[folder][-3000:]}"


@pytest.mark.parametrize("module", ["uvit_cog.kernels", "uvit_cog.kernels.cpu", "uvit_cog.kernels.row_maps",
                                    "uvit_cog.kernels.triton_rows", "uvit_cog.kernels.triton_tiling",
                                    "uvit_cog.kernels.triton_tuning", "uvit_cog.kernels.tolerances"])
def test_kernels_import_from_their_source_path(module):
    assert Path(importlib.import_module(module).__file__).resolve().parent == ROOT / "uvit_cog" / "kernels"
