"""The documentation site builds in mkdocs' strict mode (no broken link, no missing page), with a page per
catalogue layer whose derived update is rendered math."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_site_builds_strictly_with_a_page_per_layer(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    for spec in sorted((ROOT / "specs").glob("*.yaml")):
        page = (tmp_path / "site" / "layers" / spec.stem / "index.html").read_text()
        assert f"ttr generate specs/{spec.name}" in page and f"generated/{spec.stem}/" in page
    gated = (tmp_path / "site" / "layers" / "gated_delta_rule" / "index.html").read_text()
    blocks = re.findall(r'<div class="arithmatex">\\\[(.*?)\\\]</div>', gated, re.DOTALL)
    assert len(blocks) == 3, blocks  # the objective, the update and the read-out, each its own display
    assert any("S_t = e^{g} S + \\beta k v^{T} - \\beta e^{g} k k^{T} S" in b for b in blocks), blocks
    catalogue = (tmp_path / "site" / "layers" / "index.html").read_text()
    assert all(spec.stem in catalogue for spec in (ROOT / "specs").glob("*.yaml"))
