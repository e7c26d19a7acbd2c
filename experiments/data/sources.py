"""Where a corpus's documents come from: the standard library, local text files, or a Hugging Face dataset.

Each source returns its documents as ``(relative_path, content_bytes)`` pairs sorted by relative path, plus
a small dict describing where they were read from. Relative paths are POSIX-style and are what the
deterministic train/val/test split and the content hash are computed on, so moving a directory keeps both.
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from experiments.data.errors import (
    CorpusNotFoundError,
    DataError,
    EmptyCorpusError,
    MissingDependencyError,
    UndecodableTextError,
)

__all__ = [
    "DECODE_ERRORS",
    "STDLIB_EXCLUDED_DIRS",
    "Document",
    "decode_check",
    "hf_documents",
    "stdlib_documents",
    "textfile_documents",
]

Document = tuple[str, bytes]

DECODE_ERRORS = ("strict", "replace", "bytes")

# Directory names skipped anywhere below the stdlib root: installed packages, caches, and the test suites
# (test/, tests/, idlelib/idle_test, lib2to3/tests, ctypes/test, tkinter/test, unittest/test, ...).
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


def decode_check(data: bytes, name: str, errors: str) -> bytes:
    """Validate `data` as UTF-8 according to `errors` and return the bytes to tokenise.

    "strict": invalid UTF-8 raises `UndecodableTextError` naming the file and byte offset;
    "replace": invalid sequences become U+FFFD; "bytes": the raw bytes are kept unchanged.
    """
    if errors == "bytes":
        return data
    try:
        data.decode("utf-8")
        return data
    except UnicodeDecodeError as e:
        if errors == "replace":
            return data.decode("utf-8", errors="replace").encode("utf-8")
        raise UndecodableTextError(
            f"{name}: not valid UTF-8 at byte offset {e.start} ({e.reason}: {data[e.start : e.end]!r}). "
            f"Convert the file to UTF-8, exclude it, or add data.options.errors=replace (invalid bytes become "
            f"U+FFFD) or data.options.errors=bytes (raw bytes are tokenised as they are); in Python, "
            f"load_corpus(..., errors='replace').",
            file=name,
            offset=e.start,
        ) from None


def _check_errors(errors: str) -> None:
    if errors not in DECODE_ERRORS:
        raise DataError(f"errors={errors!r} is not one of {', '.join(map(repr, DECODE_ERRORS))}")


def _read(root: Path, rels: Iterable[str], errors: str) -> list[Document]:
    docs = []
    for rel in rels:
        path = root / rel
        docs.append((rel, decode_check(path.read_bytes(), str(path), errors)))
    return docs


def stdlib_documents(errors: str = "strict") -> tuple[list[Document], dict[str, Any]]:
    """The running interpreter's standard-library ``.py`` sources, test suites and installed packages excluded."""
    _check_errors(errors)
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise CorpusNotFoundError(
            f"the standard library directory {root} (sysconfig.get_paths()['stdlib']) does not exist; "
            f"this interpreter ships no sources — use the 'textfile' corpus on a directory of text instead"
        )
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]
        for f in filenames:
            if f.endswith(".py"):
                rels.append(Path(dirpath, f).relative_to(root).as_posix())
    rels.sort()
    if not rels:
        raise EmptyCorpusError(
            f"no .py files under the standard library directory {root}; "
            f"use the 'textfile' corpus on a directory of text instead"
        )
    info = {"root": str(root), "python": sys.version.split()[0], "excluded_dirs": sorted(STDLIB_EXCLUDED_DIRS)}
    return _read(root, rels, errors), info


def _glob_root(pattern: str) -> Path:
    """The longest leading part of `pattern` without glob magic: relative paths are taken against it."""
    parts = Path(pattern).parts
    keep = []
    for p in parts:
        if glob.has_magic(p):
            break
        keep.append(p)
    return Path(*keep) if keep else Path(".")


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def textfile_documents(
    path: str, suffixes: tuple[str, ...] = (".txt", ".md", ".rst", ".py"), errors: str = "strict"
) -> tuple[list[Document], dict[str, Any]]:
    """Documents of a file, a directory (recursively, files ending in `suffixes`, hidden ones skipped) or a glob.

    A single file is read whatever its suffix; a glob (``**`` allowed) takes every file it matches.
    """
    _check_errors(errors)
    expanded = os.path.expanduser(str(path))
    p = Path(expanded)
    if glob.has_magic(expanded):
        root = _glob_root(expanded)
        matches = sorted(Path(m) for m in glob.glob(expanded, recursive=True) if Path(m).is_file())
        if not matches:
            raise CorpusNotFoundError(
                f"the glob pattern {path!r} matched no files (searched from {root.resolve()}); "
                f"check the pattern — use '**/' to match files in subdirectories"
            )
        rels = sorted(m.relative_to(root).as_posix() for m in matches)
        kind = "glob"
    elif p.is_file():
        root, rels, kind = p.parent, [p.name], "file"
    elif p.is_dir():
        root, kind = p, "directory"
        sfx = tuple(s if s.startswith(".") else "." + s for s in suffixes)
        rels = []
        for dirpath, dirnames, filenames in os.walk(p):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for f in filenames:
                if f.endswith(sfx) and not f.startswith("."):
                    rels.append(Path(dirpath, f).relative_to(p).as_posix())
        rels.sort()
        if not rels:
            raise EmptyCorpusError(
                f"the directory {p.resolve()} holds no files ending in {', '.join(sfx)}; "
                f"pass suffixes=(...) to include other kinds of file, or point path at a file or glob"
            )
    else:
        raise CorpusNotFoundError(
            f"the textfile path {path!r} does not exist (resolved to {p.resolve()}); "
            f"pass an existing file, a directory, or a glob pattern such as 'data/**/*.txt'"
        )
    info = {"root": str(root.resolve()), "input": kind}
    return _read(root, rels, errors), info


def _import_datasets():
    try:
        import datasets  # noqa: PLC0415 (optional extra, imported lazily)
    except ImportError as e:
        raise MissingDependencyError(
            f"the 'hf' corpus needs the Hugging Face `datasets` library, which is not installed ({e}); "
            f"install it with: pip install 'mixerlab[hf]'"
        ) from None
    return datasets


def _is_saved_dataset(path: str) -> bool:
    p = Path(os.path.expanduser(path))
    return p.is_dir() and any((p / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def hf_documents(
    name: str,
    *,
    hf_split: str = "train",
    column: str = "text",
    data_files: str | tuple[str, ...] | None = None,
    config: str | None = None,
    revision: str | None = None,
    max_rows: int | None = None,
    errors: str = "strict",
) -> tuple[list[Document], dict[str, Any]]:
    """Rows of one split of a Hugging Face dataset; each row's `column` is a document named ``row<12-digit index>``.

    `name` is a hub name, a builder name with local `data_files` (``"json"``, ``"csv"``, ``"text"``), or a
    directory written by ``save_to_disk``. Nothing here forces a download: set ``HF_DATASETS_OFFLINE=1`` to
    make sure none happens.
    """
    _check_errors(errors)
    datasets = _import_datasets()
    try:
        if _is_saved_dataset(name):
            ds = datasets.load_from_disk(os.path.expanduser(name))
            if isinstance(ds, datasets.DatasetDict):
                if hf_split not in ds:
                    raise DataError(
                        f"the saved dataset {name!r} has no split {hf_split!r}; pass hf_split= one of {sorted(ds)}"
                    )
                ds = ds[hf_split]
        else:
            files = list(data_files) if isinstance(data_files, tuple) else data_files
            ds = datasets.load_dataset(name, config, split=hf_split, data_files=files, revision=revision)
    except DataError:
        raise
    except Exception as e:  # datasets raises many kinds; name the dataset and what to check
        raise CorpusNotFoundError(
            f"could not load the Hugging Face dataset {name!r} (config={config!r}, hf_split={hf_split!r}, "
            f"data_files={data_files!r}): {type(e).__name__}: {e}. Check the name, split and files; offline, "
            f"point name at a directory written by save_to_disk or use name='json'/'csv' with data_files=..."
        ) from e
    if column not in ds.column_names:
        raise DataError(f"the dataset {name!r} has no column {column!r}; pass column= one of {ds.column_names}")
    n = len(ds) if max_rows is None else min(len(ds), max_rows)
    docs = []
    for i, value in enumerate(ds.select(range(n))[column] if n else []):
        if value is None:
            value = ""
        if isinstance(value, str):
            data = value.encode("utf-8", errors="surrogatepass" if errors == "bytes" else "replace")
        elif isinstance(value, bytes | bytearray):
            data = decode_check(bytes(value), f"{name}[{hf_split}][{i}].{column}", errors)
        else:
            raise DataError(
                f"the column {column!r} of {name!r} holds {type(value).__name__}, not text; pick a text column "
                f"(columns: {ds.column_names})"
            )
        docs.append((f"row{i:012d}", data))
    info = {"name": name, "hf_split": hf_split, "column": column, "rows": n, "datasets_version": datasets.__version__}
    return docs, info
