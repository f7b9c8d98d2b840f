"""What every reference check needs from an author's checkout: the file, its methods compiled into
a namespace we choose (``torch`` shims, ``set_seed``), and the fixture writer."""

from __future__ import annotations

import ast
import json
import pathlib
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # our package, for checks loaded by file path
    sys.path.insert(0, str(ROOT))


def checkout_path(repo: pathlib.Path, rel: str, folder: str) -> pathlib.Path:
    """``rel`` inside the checkout ``repo``, or inside ``repo/folder`` (a folder holding the checkouts)."""
    repo = pathlib.Path(repo)
    for cand in (repo / rel, repo / folder / rel):
        if cand.exists():
            return cand
    raise FileNotFoundError(f"no {rel} under {repo} (pass the {folder} checkout or the folder holding {folder}/)")


def class_nodes(path: pathlib.Path, cls: str, names: tuple[str, ...]) -> dict[str, ast.FunctionDef]:
    """The ``ast`` nodes of the methods ``names`` of class ``cls`` in ``path``; ``LookupError`` naming
    what is missing."""
    node = next((n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef) and n.name == cls), None)
    if node is None:
        raise LookupError(f"{path.name}: no class {cls}")
    found = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef) and n.name in names}
    missing = set(names) - set(found)
    if missing:
        raise LookupError(f"{path.name}:{cls} lacks {sorted(missing)}")
    return found


def class_methods(path: pathlib.Path, cls: str, names: tuple[str, ...], namespace: dict) -> dict:
    """The methods ``names`` of class ``cls`` in ``path``, each compiled from its own source (without
    decorators) into ``namespace``."""
    text = path.read_text()
    out = {}
    for name, fn in class_nodes(path, cls, names).items():
        src = textwrap.dedent(ast.get_source_segment(text, fn))
        exec(compile(src, f"{path}:{name}", "exec"), namespace)  # noqa: S102  (the authors' code, read-only checkout)
        out[name] = namespace[name]
    return out


def main_functions(path: pathlib.Path, nested: tuple[str, ...], namespace: dict, cls: str = "TrainDataset") -> dict:
    """dLLM-RL's training scripts define their helpers inside ``main()``: the module-level class ``cls``
    and the functions ``nested`` of ``main`` in ``path``, each compiled from its own source (decorators
    such as ``@torch.no_grad`` are not part of the segment) into ``namespace``, which holds what ``main``
    closes over; ``LookupError`` naming what is missing."""
    text = path.read_text()
    tree = ast.parse(text)
    main = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"), None)
    klass = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None)
    if main is None or klass is None:
        raise LookupError(f"{path}: no main() or {cls}")
    found = {n.name: n for n in ast.walk(main) if isinstance(n, ast.FunctionDef) and n.name in nested}
    missing = set(nested) - set(found)
    if missing:
        raise LookupError(f"{path}: main() lacks {sorted(missing)}")
    for node in (klass, *(found[k] for k in nested)):
        src = textwrap.dedent(ast.get_source_segment(text, node))
        exec(compile(src, f"{path}:{node.name}", "exec"), namespace)  # noqa: S102  (the authors' code, read-only checkout)
    return namespace


def write_fixture(out_path: pathlib.Path, record: dict) -> None:
    pathlib.Path(out_path).write_text(json.dumps(record, separators=(",", ":")) + "\n")
