"""The README and docs/ cite only files the repository has; the README stays short; generated tables live in
docs/performance.md, not in the README."""

import glob
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Written by other engineers in parallel; the README links them already.
EXPECTED = {f"docs/{n}.md" for n in ("data", "models", "recipes", "finetune", "gpu-check")}
# Names a page may cite without a folder, that exist in a run folder, the cache or a build, not in the repository.
BARE_SUFFIXES = (".md", ".py", ".sh", ".cu", ".cpp")


def _top_level() -> set[str]:
    """Top-level entries of the repository: a backticked path starting with one of them is a repository path."""
    names = {p.name for p in ROOT.iterdir() if not p.name.startswith(".") or p.name == ".ci"}
    return names - {"build", "runs", "dist"}


def _cited(page: Path) -> list[tuple[str, str]]:
    """(how it was cited, the path relative to the repository root) for every file reference on the page:
    markdown links (relative to the page) and backticked repository paths (relative to the root)."""
    text = page.read_text()
    text_no_code = re.sub(r"```.*?```", "", text, flags=re.S)
    out = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text_no_code):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        out.append((f"link {target}", str(path.relative_to(ROOT))))
    top = _top_level()
    for token in re.findall(r"`([^`\s]+)`", text_no_code):
        token = token.rstrip(".,:;")
        if not re.fullmatch(r"[\w.*/-]+", token) or token.startswith(("-", "/")):
            continue  # placeholders (<...>), commands, flags, absolute or home paths
        if "/" in token:
            if token.split("/", 1)[0] in top:
                out.append((f"`{token}`", token.rstrip("/")))
        elif token.endswith(BARE_SUFFIXES) and "*" not in token:
            out.append((f"`{token}`", token))
    return out


def _exists(rel: str) -> bool:
    if "*" in rel:
        return bool(glob.glob(str(ROOT / rel)))
    if "/" in rel or (ROOT / rel).exists():
        return (ROOT / rel).exists()
    # a bare file name: some file of that name in the repository
    return any(ROOT.glob(f"**/{rel}"))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_file_exists(page):
    missing = [how for how, rel in _cited(page) if rel not in EXPECTED and not _exists(rel)]
    assert not missing, f"{page.relative_to(ROOT)} cites files the repository does not have: {missing}"


def test_the_checker_sees_a_missing_file(tmp_path, monkeypatch):
    """A page citing a missing file, a missing link target and DESIGN.md (which the repository lacks) fails."""
    page = ROOT / "docs" / "_probe_for_test.md"
    page.write_text(
        "See `conmim/no_such_module.py`, [this](no_such_page.md), `DESIGN.md` and `conmim/masking.py`.\n"
    )
    try:
        cited = dict(_cited(page))
        assert {k: _exists(v) for k, v in cited.items()} == {
            "`conmim/no_such_module.py`": False,
            "link no_such_page.md": False,
            "`DESIGN.md`": False,
            "`conmim/masking.py`": True,
        }
    finally:
        page.unlink()


def test_readme_is_short_and_leaves_tables_to_the_docs():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for marker in ("<!-- bench:start -->", "<!-- static:start -->"):
        assert marker not in text, "generated tables belong in docs/performance.md"
        assert marker in (ROOT / "docs" / "performance.md").read_text()


def test_readme_links_every_doc():
    text = (ROOT / "README.md").read_text()
    for page in [*(ROOT / "docs").glob("*.md"), *(ROOT / p for p in EXPECTED)]:
        assert f"](docs/{page.name})" in text, f"README does not link docs/{page.name}"


def test_generated_performance_tables_are_current():
    """`python -m benchmarks report --check`: docs/performance.md matches the committed results."""
    from benchmarks import report

    assert report.main(["--check"]) == 0, "run `python -m benchmarks report` and commit docs/performance.md"


HELP_WORDS = (
    "--suite",
    "quick:",
    "full:",
    "--device",
    "needs a GPU",
    "report",
    "static",
    "--ops",
    "--rounds",
)


def test_benchmarks_help_is_complete_from_another_directory(tmp_path):
    """``python -m benchmarks --help`` started outside the checkout (the checkout on the path): every option
    explained, the sub-commands named, and no torch import needed for it."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "COLUMNS": "100"}
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    for word in HELP_WORDS:
        assert word in r.stdout, word


def test_conmim_bench_finds_the_checkout_from_anywhere(tmp_path, monkeypatch, capsys):
    """``conmim-bench`` / ``python -m conmim.bench``: the benchmarks of the checkout the imported package
    belongs to, whatever the working directory."""
    from conmim import bench

    monkeypatch.chdir(tmp_path)
    assert bench.checkout() == ROOT
    with pytest.raises(SystemExit) as exc:
        bench.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in HELP_WORDS:
        assert word in out, word


def test_every_preset_the_docs_name_resolves():
    """``--config NAME`` in the README and docs/ names a preset that exists and validates."""
    from conmim import config as cfgmod

    names = set()
    for page in PAGES:
        names |= set(re.findall(r"--config ([a-z_0-9]+)", page.read_text()))
    from conmim.finetune.config import FinetuneConfig

    train, finetune = set(cfgmod.presets(cfgmod.TrainConfig)), set(cfgmod.presets(FinetuneConfig))
    assert {"tiny_demo", "my_images_cpu"} <= names <= train | finetune
    for name in names - train:
        cfgmod.resolve(FinetuneConfig, name, {})
    for name in names & train:
        cfg = cfgmod.resolve(cfgmod.TrainConfig, name, {"data": "samples:photos"})
        assert cfg.image_size % cfg.patch_size == 0 and (cfg.image_size // cfg.patch_size) ** 2 >= 64, name


def test_the_demo_keeps_fewer_checkpoints():
    from conmim import config as cfgmod

    demo = cfgmod.resolve(cfgmod.TrainConfig, "tiny_demo", {})
    assert demo.keep_every_epochs == 0 or demo.keep_every_epochs >= demo.epochs / 2


def test_every_slow_entry_names_a_test():
    """conftest.SLOW_TESTS: a renamed test must not drop out of the slow layer (and into the default) silently."""
    from tests.conftest import SLOW_TESTS

    for entry in SLOW_TESTS:
        path, _, name = entry.partition("::")
        source = (ROOT / path).read_text()
        func = name.split("[", 1)[0]
        assert func == "*" or f"def {func}(" in source, entry
