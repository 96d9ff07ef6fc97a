"""Every loader against a corpus of hostile files: a clear error naming the file, fast, in bounded memory,
and never code execution.

The corpus (tests/hostile/make_corpus.py) is built in a tmp dir and fed to the loaders by
tests/hostile/run_corpus.py in a fresh process, so that a parser that loops is cut off by a timer
instead of hanging the suite, and the peak RSS each file adds is measured from a clean baseline.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HOSTILE = REPO / "tests" / "hostile"
sys.path.insert(0, str(HOSTILE))

import make_corpus  # noqa: E402

LOADERS = ("base", "tokenizer", "adapter", "interop", "data", "scienceqa", "image")
TIME_LIMIT_S = 5.0  # per hostile file; honest refusals here take milliseconds
MEMORY_LIMIT_MIB = 64  # peak RSS growth per hostile file; every file is tiny, whatever its header claims


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(root, cases, results by case name) after running every case in a fresh process."""
    root = tmp_path_factory.mktemp("hostile") / "corpus"
    cases = make_corpus.build(root)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(HOSTILE / "run_corpus.py"), str(root)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {r["name"]: r for r in map(json.loads, filter(None, proc.stdout.splitlines()))}
    return root, cases, results


def show(capsys, title: str, lines: list[str]) -> None:
    """Print figures into the test output even when pytest captures it (no -s needed)."""
    with capsys.disabled():
        print("\n".join(["", f"-- {title} --", *lines]))


def test_the_corpus_covers_every_loader(corpus):
    _, cases, results = corpus
    assert sorted({c.loader for c in cases}) == sorted(LOADERS)
    assert {c.name for c in cases} == set(results)  # every file was tried, none skipped
    for loader in LOADERS:
        hostile = [c for c in cases if c.loader == loader and c.expect]
        assert len(hostile) >= 8, loader
        assert any(c.loader == loader and c.expect is None for c in cases), f"{loader} has no control"


@pytest.mark.parametrize("loader", LOADERS)
def test_hostile_files_are_refused_with_a_clear_error(corpus, loader):
    root, cases, results = corpus
    problems = []
    for case in (c for c in cases if c.loader == loader):
        r = results[case.name]
        if case.expect is None:
            if r["error"] is not None:
                problems.append(f"{case.name} ({case.about}): should load, raised {r['error']}: {r['message'][:300]}")
            continue
        if r["error"] != case.expect or not r["is_value_error"]:
            problems.append(f"{case.name} ({case.about}): expected {case.expect}, got {r['error']}: "
                            f"{r['message'][:300]}")
        elif case.names not in r["message"]:
            problems.append(f"{case.name}: the message does not name {case.names!r}: {r['message'][:300]}")
        if r["seconds"] > TIME_LIMIT_S:
            problems.append(f"{case.name} ({case.about}): took {r['seconds']:.1f} s")
        if r["peak_growth_mib"] > MEMORY_LIMIT_MIB:
            problems.append(f"{case.name} ({case.about}): peak RSS grew by {r['peak_growth_mib']:.0f} MiB")
    assert not problems, "\n".join(problems)


def test_no_pickle_payload_ever_ran(corpus):
    """The payloads are live (an unsafe load runs them), yet no loader ran one."""
    root, cases, _ = corpus
    payload_files = [c for c in cases if "pickle" in c.name]
    assert len(payload_files) >= 7
    assert not list(root.glob(f"{make_corpus.MARKER_PREFIX}*")), "a loader executed code from a pickle payload"

    import torch

    shard = root / "base" / "meta-pickle" / "consolidated.00.pth"
    torch.load(shard, weights_only=False)  # what a careless loader would do
    marker = root / f"{make_corpus.MARKER_PREFIX}meta-pickle"
    assert marker.read_text() == "code ran"
    marker.unlink()
    raw = (root / "interop" / "v1-raw-pickle.pth").read_bytes()
    pickle.loads(raw)
    assert (root / f"{make_corpus.MARKER_PREFIX}v1-raw-pickle").exists()


def test_the_readme_states_the_corpus_and_its_figures_print(corpus, capsys):
    """The README's count of files is the corpus's; the per-loader table prints for the reader (`-s` not needed)."""
    import re

    _, cases, results = corpus
    stated = re.search(r"writes\s+(\d+)\s+small\s+files\s+\((\d+)\s+hostile,\s+(\d+)\s+valid\s+controls\)",
                       (REPO / "README.md").read_text())
    assert stated, "README: the hostile-files paragraph no longer states the corpus size"
    hostile = sum(c.expect is not None for c in cases)
    assert tuple(map(int, stated.groups())) == (len(cases), hostile, len(cases) - hostile)
    lines = [f"{'loader':<10} {'files':>5} {'controls ok':>11} {'rejected':>8} {'max s':>7} {'max peak MiB':>12}"]
    for loader in LOADERS:
        mine = [c for c in cases if c.loader == loader]
        hostile_ones = [c for c in mine if c.expect]
        rejected = sum(results[c.name]["error"] == c.expect for c in hostile_ones)
        controls = sum(results[c.name]["error"] is None for c in mine if c.expect is None)
        slowest = max(results[c.name]["seconds"] for c in hostile_ones)
        peak = max(results[c.name]["peak_growth_mib"] for c in hostile_ones)
        lines.append(f"{loader:<10} {len(mine):>5} {controls:>5}/{len(mine) - len(hostile_ones):<5} "
                     f"{rejected:>4}/{len(hostile_ones):<3} {slowest:>7.3f} {peak:>12.1f}")
    show(capsys, "hostile files per loader", lines)


# ----------------------------------------------------------------------------------------------
# No code path that could execute a file: checked in the sources themselves

SOURCE_DIRS = ("mmadapter", "app", "eval")


def unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func, kwargs = node.func, {k.arg: k.value for k in node.keywords}
        name = func.id if isinstance(func, ast.Name) else None
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
        attr = func.attr if isinstance(func, ast.Attribute) else None
        if name in ("eval", "exec", "__import__"):
            found.append((node.lineno, f"{name}()"))
        if owner == "pickle" and attr in ("load", "loads", "Unpickler"):
            found.append((node.lineno, f"pickle.{attr}"))
        if owner == "torch" and attr == "load":
            weights_only = kwargs.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append((node.lineno, "torch.load without weights_only=True"))
        if owner == "yaml" and attr in ("load", "unsafe_load", "full_load"):
            found.append((node.lineno, f"yaml.{attr} (use yaml.safe_load)"))
        if attr == "load" and isinstance(kwargs.get("allow_pickle"), ast.Constant) and kwargs["allow_pickle"].value:
            found.append((node.lineno, "numpy load with allow_pickle=True"))
        trust = kwargs.get("trust_remote_code")
        if trust is not None and not (isinstance(trust, ast.Constant) and trust.value is False):
            found.append((node.lineno, "trust_remote_code"))
        shell = kwargs.get("shell")
        if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
            found.append((node.lineno, "subprocess with shell=True"))
    return found


def test_sources_never_unpickle_eval_or_trust_remote_code():
    sources = [p for d in SOURCE_DIRS if (REPO / d).is_dir() for p in sorted((REPO / d).rglob("*.py"))]
    assert len(sources) > 20
    found = [f"{p.relative_to(REPO)}:{line}: {what}" for p in sources
             for line, what in unsafe_calls(ast.parse(p.read_text(encoding="utf-8"), str(p)))]
    assert not found, "\n".join(found)


def test_the_source_check_catches_what_it_looks_for():
    code = ("import torch, pickle, yaml\ntorch.load(p)\ntorch.load(p, weights_only=False)\npickle.loads(b)\n"
            "eval(s)\nyaml.load(f)\nAutoModel.from_pretrained(x, trust_remote_code=True)\n"
            "subprocess.run(c, shell=True)\nnp.load(f, allow_pickle=True)\ntorch.load(p, weights_only=True)\n")
    assert [line for line, _ in unsafe_calls(ast.parse(code))] == [2, 3, 4, 5, 6, 7, 8, 9]
