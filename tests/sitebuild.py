"""One fast-mode build of the course site per test run, shared by test_tutorials.py and test_site.py.

``docs/build_site.py`` executes every tutorial as a notebook (nbclient, an IPython kernel, as a
reader's Jupyter would) and renders the site. Building it takes most of a minute, so the run
builds it once: the first pytest worker that needs it builds it under a file lock in the run's
shared temporary folder, and every other test (and worker) reuses it.
"""

import fcntl
import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_ENV = {"MINILORA_FAST": "1", "MPLBACKEND": "Agg", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "MINILORA_BACKEND": ""}


def require_docs_extra():
    for module in ("jupytext", "nbclient", "nbconvert", "ipykernel", "mistune", "nbformat"):
        pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[docs]')")


@pytest.fixture(scope="session")
def fast_site(tmp_path_factory):
    """{"site": folder, "notebooks": folder of executed .ipynb, "seconds": build time, "log": its output}."""
    require_docs_extra()
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # one folder for all workers
    target, done = shared / "fast-site", shared / "fast-site.json"
    with open(shared / "fast-site.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            env = {**os.environ, **FAST_ENV, "PYTHONPATH": REPO}
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, os.path.join(REPO, "docs", "build_site.py"), "--out",
                                   str(target / "site"), "--notebooks", str(target / "notebooks")],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
            if proc.returncode != 0:
                pytest.fail(f"the fast-mode site build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
            done.write_text(json.dumps({"site": str(target / "site"), "notebooks": str(target / "notebooks"),
                                        "seconds": time.perf_counter() - start,
                                        "log": proc.stdout + proc.stderr}))
        return json.loads(done.read_text())
