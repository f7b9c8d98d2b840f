"""Rows from files or the Hugging Face hub: one reader, on ``datasets``.

Where a real task's rows come from (:func:`resolve_source`), first match wins:

1. ``task.path``: a local file (.jsonl / .json / .parquet / .csv), a folder (``train*`` /
   ``test*`` files, or a ``datasets.save_to_disk`` folder) or a hub dataset name;
2. ``$DLLM_RL_DATA/<task folder>`` when that folder exists (CI and the tests use ``../shared/data``);
3. the task's public hub dataset (network, or a populated HF cache).

Every failure is one :class:`DataError` line naming the file or dataset and what to do; an
empty file or folder is an error, never zero rows.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from rl.tasks.registry import DataError

DATA_ENV = "DLLM_RL_DATA"
ROOT = Path(__file__).resolve().parents[2]
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class HubSource:
    """``datasets.load_dataset(name, config, split=split)``."""

    name: str
    config: str | None = None
    split: str = "train"


def looks_local(path: str) -> bool:
    """A path meant as a local file/folder (not a hub name): it exists, has a data-file suffix,
    or starts like a filesystem path."""
    return (resolve_path(path) is not None or Path(path).suffix.lower() in BUILDERS
            or path.startswith(("/", "./", "../", "~")))


def resolve_path(path: str) -> Path | None:
    """The existing local path (as given, or relative to the repository root), else None."""
    for cand in (Path(path).expanduser(), ROOT / path):
        if cand.exists():
            return cand
    return None


def resolve_source(cfg, folder: str) -> str | None:
    """``task.path``, else ``$DLLM_RL_DATA/<folder>`` if it exists, else None (= the hub default)."""
    if cfg.path:
        return str(cfg.path)
    root = os.environ.get(DATA_ENV)
    if root and (Path(root).expanduser() / folder).exists():
        return str(Path(root).expanduser() / folder)
    return None


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars and no error log lines from ``datasets``: failures become our one line."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def read_file(path: Path) -> list[dict]:
    """Rows of one .jsonl / .json (a list of records) / .parquet / .csv file."""
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl, .json, .parquet or .csv)")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: no rows (the file is empty)")
    with _quiet_datasets() as datasets:
        try:
            rows = datasets.load_dataset(builder, data_files={"rows": str(path)}, split="rows").to_list()
        except Exception as e:  # noqa: BLE001 - datasets raises many types; each becomes one line
            raise DataError(f"{path}: cannot read rows ({_cause(e)})") from e
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _split_file(folder: Path, split: str) -> Path | None:
    files = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in BUILDERS]
    for pattern in (f"{split}*", f"*{split}*"):
        hits = [p for p in files if p.match(pattern)]
        if hits:
            return hits[0]
    if split == "test" and len(files) == 1 and "train" not in files[0].name:
        return files[0]  # a folder with one unnamed file (e.g. HumanEval.jsonl): the evaluation set
    return None


def read_local(path: Path, split: str) -> list[dict] | None:
    """A split of a local folder (split files or a ``save_to_disk`` folder); None if absent."""
    if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
        with _quiet_datasets() as datasets:
            try:
                data = datasets.load_from_disk(str(path))
            except Exception as e:  # noqa: BLE001
                raise DataError(f"{path}: cannot load the saved dataset ({_cause(e)})") from e
        if hasattr(data, "keys"):  # a DatasetDict
            return data[split].to_list() if split in data else None
        return data.to_list() if split == "train" else None
    if not any(p.suffix.lower() in BUILDERS for p in path.iterdir()):
        raise DataError(f"{path}: no data files (.jsonl, .json, .parquet or .csv) in this folder")
    found = _split_file(path, split)
    return read_file(found) if found is not None else None


def read_hub(source: HubSource, where: str, fix: str) -> list[dict] | None:
    """A split of a hub dataset; None if the dataset has no such split. ``where`` / ``fix`` word
    the one-line error (who asked, and how to do without the hub)."""
    with _quiet_datasets() as datasets:
        try:
            return datasets.load_dataset(source.name, source.config, split=source.split).to_list()
        except ValueError as e:
            if "split" in str(e).lower() and "unknown" in str(e).lower():
                return None
            raise DataError(f"{where}: cannot load {source.name!r} from the hub ({_cause(e)})") from e
        except Exception as e:  # noqa: BLE001 - offline, not found, ...: one line with the way out
            raise DataError(f"{where}: cannot load {source.name!r} from the hub ({_cause(e)}); {fix}") from e


def load_split(source: str | None, split: str, *, task: str, folder: str, hub: dict[str, HubSource],
               hub_config: str | None = None) -> list[dict] | None:
    """Rows of ``split`` (``train`` / ``test``) from ``source`` (see :func:`resolve_source`) or,
    when ``source`` is None, from the task's hub default ``hub[split]``. None: no such split.

    A single local file is one pool of rows: the training split of a task that trains (its
    test rows are then held out of it), the test split of an evaluation-only task."""
    where = f"task {task}"
    fix = f"use a local copy: {DATA_ENV}=<folder containing {folder}/> or task.path=<file, folder or hub name>"
    if source is None:
        return read_hub(hub[split], where, fix) if split in hub else None
    if looks_local(source):
        path = resolve_path(source)
        if path is None:
            raise DataError(f"task.path={source}: no such file or folder")
        if path.is_file():
            pool_split = "train" if "train" in hub or not hub else "test"
            return read_file(path) if split == pool_split else None
        return read_local(path, split)
    config = hub_config or next((h.config for h in hub.values() if h.name == source), None)
    return read_hub(HubSource(source, config, split), where, fix)


def describe(source: str | None, hub: dict[str, HubSource]) -> str:
    """Where rows come from, for messages and ``Task.source``."""
    return source if source is not None else " + ".join(sorted({h.name for h in hub.values()}))
