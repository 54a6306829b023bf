"""The package's shape: stages import one way (import-linter's contract in pyproject.toml), no import cycle
(grimp's graph, the one import-linter builds), no module over 400 lines, the public names still importable
from ``im2vec``, and a checkpoint written before the modules moved into subpackages still loads and tags
as it did then."""

import json
import subprocess
import sys
from pathlib import Path

import grimp
import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

MAX_LINES = 400


def test_stages_import_one_way():
    proc = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative), and modules importing
    themselves."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in edges:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(edges[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1 or node in edges[node]:
                    out.append(sorted(comp))
    return out


def test_no_import_cycle():
    graph = grimp.build_graph("im2vec", cache_dir=None)  # imports inside functions count too
    assert len(graph.modules) > 40
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    g = grimp.ImportGraph()
    for m in ("p", "p.a", "p.b", "p.c", "p.d"):
        g.add_module(m)
    g.add_import(importer="p.a", imported="p.b")
    g.add_import(importer="p.b", imported="p.c")
    g.add_import(importer="p.c", imported="p.a")
    g.add_import(importer="p.d", imported="p.a")
    assert _cycles(g) == [["p.a", "p.b", "p.c"]]


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "im2vec").rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these by concept: {long}"


def test_public_names_import_from_the_package():
    proc = subprocess.run([sys.executable, "-c", "import sys, im2vec; assert 'torch' not in sys.modules; "
                           "from im2vec import Tagger; print(Tagger.__module__, im2vec.__version__)"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "im2vec.use.tagger"


@pytest.mark.parametrize("stem", ["before-subpackages"])
def test_a_checkpoint_from_before_the_move_loads_and_tags_as_it_did(stem):
    """tests/data/before-subpackages.ckpt: a tiny run of commit 2c84955 (modules side by side in im2vec/),
    its optimizer states dropped; the .json holds the tags and scores that commit's Tagger gave."""
    from im2vec.use.predict import Tagger

    want = json.loads((ROOT / "tests" / "data" / f"{stem}.json").read_text())
    tagger = Tagger.from_checkpoint(Path(ROOT / "tests" / "data" / f"{stem}.ckpt"))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    got = tagger.tag([img], k=want["k"])[0]
    assert [t for t, _ in got] == [t for t, _ in want["tags"]]
    assert [s for _, s in got] == pytest.approx([s for _, s in want["tags"]], abs=1e-6)
