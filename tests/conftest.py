import os

# Compile time dominates this suite (hundreds of small XLA:CPU programs, most of which then run for milliseconds),
# and much of it is LLVM's optimiser. At backend optimisation level 0 the same programs compile in about 60% of the
# CPU time (tests/models/test_hybrid.py's cached-decode tests: 111 s -> 68 s) and compute the same values; they
# run slower, which no test measures (speed is measured in benchmarks/, with XLA's defaults). Set before jax is
# imported; subprocess tests (tests/fake_devices.py) pass it on.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import pytest  # noqa: E402

from tests.tiny import tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """tiny(preset_name, **config_overrides) -> (model, params), each built once per session."""
    return tiny_model


# No silent skips: an install without the test extra would turn the HF parity tests (importorskip) into skips and
# leave the run green. A skipped test fails the session unless it carries @pytest.mark.allowed_skip (e.g. a
# GPU-only test on a CPU machine); the skip summary is printed either way (-rs in pyproject's addopts).
_unexpected_skips = []


# The suite's longest tests (notebook kernels, study runs, 8-device subprocesses: 15-35 s each) start first, so the
# two xdist workers end together on short tests instead of one waiting out a long tail alone.
LONG_FIRST = ("tests/test_notebooks.py", "tests/test_pipeline.py", "tests/test_efficient_rl_study.py",
              "tests/test_sharding.py", "tests/train/test_sharded.py", "tests/test_parscale_study.py",
              "tests/test_tts_study.py", "tests/train/test_rl_train.py", "tests/train/test_rl_loop.py")


def pytest_collection_modifyitems(items):
    rank = {path: i for i, path in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(LONG_FIRST)))  # stable: the rest keep order


def pytest_configure(config):
    config.addinivalue_line("markers", "allowed_skip: this test may be skipped without failing the run")


def _record(report):
    if report.skipped and not hasattr(report, "wasxfail") and "allowed_skip" not in getattr(report, "keywords", {}):
        _unexpected_skips.append(report.nodeid or str(report.fspath))


def pytest_runtest_logreport(report):
    _record(report)


def pytest_collectreport(report):
    _record(report)


def pytest_terminal_summary(terminalreporter):
    if _unexpected_skips:
        terminalreporter.write_line(f"{len(_unexpected_skips)} unexpected skip(s) (not marked allowed_skip), failing "
                                    f"the run: {sorted(set(_unexpected_skips))}", red=True)


def pytest_sessionfinish(session, exitstatus):
    if _unexpected_skips and exitstatus == 0:
        session.exitstatus = 1
