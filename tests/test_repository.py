"""What a reader browsing the repository finds: executed notebooks with small outputs, no stray files."""

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebooks_are_committed_executed_with_small_outputs(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, path
    counts = [c.get("execution_count") for c in code]
    # executed top to bottom in one kernel: 1, 2, ..., n
    assert counts == list(range(1, len(code) + 1)), (path.name, counts)
    assert sum(bool(c.get("outputs")) for c in code) >= len(code) // 2, path.name
    for c in code:
        for o in c.get("outputs", []):
            assert o["output_type"] != "error", (path.name, o.get("ename"), o.get("evalue"))
            assert "text/html" not in o.get("data", {}), path.name     # the text repr is enough, and small
    assert path.stat().st_size < 100_000, (path.name, path.stat().st_size)


def test_no_backup_or_leftover_files_are_tracked():
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    suspicious = [f for f in files if any(s in f for s in (".partial", ".old-", ".bak", "~", ".orig"))
                  or (f.startswith("ensemble/data/") and f.endswith((".tar", ".tar.gz", ".tgz")))]
    assert suspicious == []
