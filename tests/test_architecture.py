"""docs/architecture.md matches the tree: every file of the package, the benchmarks and the
docs is in its layout, and everything its layout names exists."""

import re

from helpers_train import REPO

DOC = REPO / "docs" / "architecture.md"
FOLDERS = ("puregpt", "benchmarks", "docs", "examples", "notebooks")


def layout() -> set[str]:
    """The paths the layout block names (relative to the repository)."""
    block = re.search(r"## Layout\n\n```\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    paths, folder = set(), ""
    for line in block.group(1).splitlines():
        indent = len(line) - len(line.lstrip())
        if indent > 2:  # a description's second line
            continue
        name = line.split()[0]
        if not line.startswith(" "):
            folder = name if name.endswith("/") else ""
            paths.add(name.rstrip("/"))
        else:
            paths.add(folder + name.rstrip("/"))
    return paths


def tree() -> set[str]:
    found = {p.name for p in REPO.glob("*.py")}
    for folder in FOLDERS:
        base = REPO / folder
        if base.is_dir():
            found.add(folder)
            for p in base.iterdir():
                if p.name.startswith(".") or p.name == "__pycache__" or p.suffix == ".png":
                    continue
                if p.suffix == ".md":
                    continue  # the docs list themselves in prose
                found.add(f"{folder}/{p.name}")
    return found


def test_the_layout_names_every_file_and_nothing_else():
    named, present = layout(), tree()
    assert sorted(present - named) == [], "files missing from docs/architecture.md"
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert missing == [], "docs/architecture.md names files that do not exist"


def test_the_functions_the_document_names_exist():
    import importlib

    from puregpt import model, ops, optim, sample
    train = importlib.import_module("puregpt.train")  # (puregpt.train is also the function)
    text = DOC.read_text(encoding="utf-8")
    modules = {"train": train, "model": model, "ops": ops, "optim": optim, "sample": sample}
    for module, name in re.findall(r"`(train|model|ops|optim|sample)\.(?!py`)([A-Za-z_]+)", text):
        obj = modules[module]
        assert hasattr(obj, name), f"{module}.{name}"
    for name in re.findall(r"`Run\.([a-z_]+)`", text):
        assert hasattr(train.Run, name), f"Run.{name}"
