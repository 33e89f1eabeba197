"""The notebooks under notebooks/ run top to bottom in a fresh python3 kernel (nbclient), each in a few tens of
seconds on a 2-core CPU (with shorter training runs, see STEPS). Their cells assert what must hold (speculative output
== greedy output, accuracies in [0, 1], ...), so an API change that breaks a notebook fails here. The repository
files stay without outputs: each notebook is executed from an in-memory copy, and the executed copy is written
under tmp_path only."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("01_quickstart", "02_test_time_scaling", "03_efficient_rl")
CELL_TIMEOUT_S = 300  # per cell: a hung kernel fails the test instead of the whole suite
# The notebooks are dominated by XLA:CPU compilation (a dozen programs each, most of which then run for
# milliseconds), much of it in LLVM's optimiser. Without it compiles take about half as long and the tiny training
# steps somewhat longer: 10-35% less CPU time per notebook, measured. It changes how fast the programs run, not what
# they compute; the notebooks themselves (and anyone running them) keep XLA's defaults.
XLA_FLAGS = "--xla_backend_optimization_level=0"
# The training runs inside the notebooks are cut here (SFT from 100-150 steps to 30, about 50 ms a step at that
# level; the two RL runs from 6 steps to 3): their cells assert what holds after any amount of training
# (speculative == greedy, accuracies in [0, 1], one logged RL step per step, ...), not how well the model learned.
# Each constant must be found, so a renamed one fails this test.
STEPS = {"01_quickstart": [("STEPS = 150\n", "STEPS = 30\n")],
         "02_test_time_scaling": [("STEPS = 150\n", "STEPS = 30\n")],
         "03_efficient_rl": [("SFT_STEPS = 100\n", "SFT_STEPS = 30\n"), ("RL_STEPS = 6\n", "RL_STEPS = 3\n")]}


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {XLA_FLAGS}".strip()
    return env  # MPLBACKEND stays unset: ipykernel then selects matplotlib's inline backend, which needs no display


def test_the_notebooks_are_stored_without_outputs():
    assert sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb")) == sorted(NOTEBOOKS)
    for name in NOTEBOOKS:
        nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{name}: clear the outputs"
        assert 'if "google.colab" in sys.modules' in code[0].source, f"{name}: the first cell installs lmx on Colab"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    for full, cut in STEPS[name]:
        cells = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(full)]
        assert len(cells) == 1, f"{name}: no cell starts with {full!r}"
        cells[0].source = cut + cells[0].source[len(full):]
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}})
    try:
        client.execute(env=_kernel_env())  # raises CellExecutionError on the first failing cell
    finally:
        nbformat.write(nb, tmp_path / f"{name}.ipynb")  # the executed copy, for inspection; never the repo file
