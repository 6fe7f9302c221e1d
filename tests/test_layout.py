"""The import layout: every module of ours is imported as ``virtwarden.<...>``.

In a checkout the card's folders (worker/, tasks/, ...) are also importable by their
bare names; a module imported under both names would be two modules (two SQLAlchemy
metadata, two Celery apps, two configurations). Nothing may use the bare names.
"""
from __future__ import annotations

import ast
from pathlib import Path

import virtwarden

REPO = Path(__file__).resolve().parent.parent
SKIP = {".git", ".venv", ".typecheck", "build", ".testhost"}


def _sources() -> list[Path]:
    return [p for p in REPO.rglob("*.py") if not SKIP & set(p.relative_to(REPO).parts)
            and "egg-info" not in str(p)]


def _bare_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [f"{path.relative_to(REPO)}:{node.lineno}: {n}" for n in names
                  if n.split(".")[0] in virtwarden.MAPPED]
    return found


def test_no_module_of_ours_is_imported_by_its_folders_bare_name():
    sources = _sources()
    assert len(sources) > 100
    bare = [hit for p in sources for hit in _bare_imports(p)]
    assert not bare, "import these as virtwarden.<name>:\n" + "\n".join(bare)


def test_the_mapped_folders_are_the_packages_of_the_namespace():
    import virtwarden.tasks.backup
    import virtwarden.worker.runner

    assert Path(virtwarden.tasks.backup.__file__).parent.name == "tasks"
    assert virtwarden.worker.runner.__name__ == "virtwarden.worker.runner"
    assert all((REPO / name / "__init__.py").is_file() for name in virtwarden.MAPPED)
