import subprocess
import sys


def test_import_lmx_exposes_its_subpackages():
    """`import lmx` alone gives lmx.models, lmx.decoding, lmx.train and lmx.data (a fresh interpreter, so no other
    test's imports can make it pass)."""
    code = ("import lmx; assert callable(lmx.models.build) and callable(lmx.decoding.generate) and "
            "callable(lmx.decoding.speculative_generate) and callable(lmx.train.loop.train) and "
            "callable(lmx.data.get_task)")
    subprocess.run([sys.executable, "-c", code], check=True)
