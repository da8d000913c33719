"""Text corpora for layer statistics.

A corpus is one of

* ``"pydoc"`` (the offline default): the Python reference documentation that
  ships with every CPython (``pydoc_data.topics``), cut into paragraphs and
  merged into texts of at least 400 characters: about 900 texts, 110k SmolLM2
  tokens, identical on every machine with the same Python version;
* a path to a ``.txt`` file (one text per non-empty line), a ``.jsonl`` file
  (one JSON object per line with a ``"text"`` field), a ``.json`` file (a list
  of strings or of objects with ``"text"``), or a folder of such files (read
  in sorted order, recursively);
* a Hugging Face dataset that is already on local disk: ``"wikipedia"`` and
  ``"wikitext"`` (ROME's two, mapped to ROME's configs ``20200501.en`` and
  ``wikitext-103-raw-v1``) or ``"hf:NAME[:CONFIG[:SPLIT]]"``. This needs the
  ``datasets`` package, imported only then;
* any iterable of strings (only the first ``n_samples`` are read).

:func:`open_corpus` gives a :class:`Corpus`: an identity (kind, name and a
SHA-256 of the content) that the statistics cache records, and a way to
iterate the texts from the start again, which resuming needs.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..data import json_file, json_lines
from ..lm import InputError

DEFAULT_CORPUS = "pydoc"
_ROME_HF = {"wikipedia": ("wikipedia", "20200501.en"), "wikitext": ("wikitext", "wikitext-103-raw-v1")}
_TEXT_SUFFIXES = (".txt", ".jsonl", ".json")


@dataclass
class Corpus:
    """Texts to compute statistics over. ``texts()`` iterates from the start."""

    kind: str          # builtin | file | folder | hf | iterable
    name: str          # what the user gave (a path, a dataset name, ...)
    digest: str        # SHA-256 of the content (hf: the dataset's fingerprint)
    texts: Callable[[], Iterator[str]]

    @property
    def identity(self) -> dict:
        return {"kind": self.kind, "name": self.name, "digest": self.digest}

    @property
    def slug(self) -> str:
        """A short file-name-safe name: ``pydoc-3f2a9c1b``."""
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(self.name).name if self.kind in ("file", "folder")
                      else self.name)[:40].strip("_.") or self.kind
        return f"{base}-{self.digest[:10]}"


def _nonempty(it: Iterable) -> Iterator[str]:
    for t in it:
        if not isinstance(t, str):
            raise InputError(f"corpus items must be strings, got {type(t).__name__}")
        if t.strip():
            yield t


def pydoc_texts(min_chars: int = 400) -> list[str]:
    """The built-in corpus: Python's reference documentation, in paragraphs
    merged up to ``min_chars`` characters (topics in sorted order)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split it out
        raise InputError("the built-in corpus 'pydoc' needs Python's pydoc_data module, which this "
                         "Python lacks; pass a text/jsonl file, a folder or a list of strings") from None
    out = []
    for key in sorted(topics):
        buf = ""
        for para in re.split(r"\n\s*\n", topics[key]):
            para = para.strip()
            if not para:
                continue
            buf = f"{buf}\n\n{para}" if buf else para
            if len(buf) >= min_chars:
                out.append(buf)
                buf = ""
        if buf:
            out.append(buf)
    return out


def _file_texts(path: Path) -> Iterator[str]:
    suf = path.suffix.lower()
    if suf == ".jsonl":
        for i, rec in json_lines(path, lambda i, e: InputError(f"{path}:{i}: not JSON ({e.msg})")):
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise InputError(f"{path}:{i}: a jsonl corpus needs a string field \"text\" on every line")
            yield rec["text"]
    elif suf == ".json":
        data = json_file(path, lambda e: InputError(f"{path}: not JSON ({getattr(e, 'msg', e)})"))
        if not isinstance(data, list):
            raise InputError(f"{path}: a JSON corpus must be a list of strings or of {{\"text\": ...}} objects")
        for i, rec in enumerate(data):
            if isinstance(rec, dict):
                rec = rec.get("text")
            if not isinstance(rec, str):
                raise InputError(f"{path}: item {i} is neither a string nor an object with a string \"text\"")
            yield rec
    else:
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield line.rstrip("\n")


def _sha_file(path: Path, h=None):
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h


def _sha_texts(texts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _hf_corpus(name: str, config: str | None, split: str) -> Corpus:
    try:
        import datasets
    except ImportError:
        raise InputError(f"corpus {name!r} is a Hugging Face dataset, which needs the `datasets` package "
                         "(pip install datasets) and the data on local disk; or pass a text/jsonl file, "
                         "a folder, a list of strings, or 'pydoc' (the built-in corpus)") from None
    try:
        ds = datasets.load_dataset(name, config, split=split, download_mode="reuse_dataset_if_exists")
    except Exception as e:  # noqa: BLE001 - any loading failure becomes one clear message
        raise InputError(f"cannot load the Hugging Face dataset {name!r} (config {config!r}, split {split!r}) "
                         f"from local disk: {e}") from None
    if "text" not in ds.column_names:
        raise InputError(f"dataset {name!r} has no 'text' column (columns: {ds.column_names})")
    label = ":".join(x for x in (name, config, split) if x)
    return Corpus("hf", label, str(getattr(ds, "_fingerprint", "")) or _sha_texts(ds["text"][:1000]),
                  lambda: iter(ds["text"]))


def open_corpus(corpus, n_samples: int | None = None) -> Corpus:
    """Resolve what the user gave into a :class:`Corpus` (see the module doc)."""
    if corpus is None:
        corpus = DEFAULT_CORPUS
    if isinstance(corpus, Corpus):
        return corpus
    if isinstance(corpus, (str, os.PathLike)):
        s = str(corpus)
        p = Path(s).expanduser()
        if s == "pydoc":
            texts = pydoc_texts()
            return Corpus("builtin", f"pydoc-py{sys.version_info.major}.{sys.version_info.minor}",
                          _sha_texts(texts), lambda: iter(texts))
        if p.is_file():
            if p.suffix.lower() not in _TEXT_SUFFIXES:
                raise InputError(f"corpus file {p} must be .txt, .jsonl or .json")
            return Corpus("file", str(p.resolve()), _sha_file(p).hexdigest(), lambda: _file_texts(p))
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _TEXT_SUFFIXES)
            if not files:
                raise InputError(f"corpus folder {p} holds no .txt, .jsonl or .json files")
            h = hashlib.sha256()
            for f in files:
                h.update(str(f.relative_to(p)).encode())
                _sha_file(f, h)

            def gen():
                for f in files:
                    yield from _file_texts(f)
            return Corpus("folder", str(p.resolve()), h.hexdigest(), gen)
        if s.startswith("hf:"):
            parts = s[3:].split(":")
            if not parts[0]:
                raise InputError(f"bad dataset spec {s!r}; use hf:NAME[:CONFIG[:SPLIT]]")
            return _hf_corpus(parts[0], parts[1] if len(parts) > 1 and parts[1] else None,
                              parts[2] if len(parts) > 2 else "train")
        if s in _ROME_HF:
            return _hf_corpus(*_ROME_HF[s], "train")
        if os.sep in s or s.endswith(_TEXT_SUFFIXES):
            raise InputError(f"corpus path {s!r} does not exist")
        raise InputError(f"unknown corpus {s!r}: not a file or folder, not 'pydoc', not "
                         "'wikipedia'/'wikitext', and not 'hf:NAME[:CONFIG[:SPLIT]]'")
    if isinstance(corpus, Iterable):
        it = _nonempty(corpus)
        texts = []
        for t in it:
            texts.append(t)
            if n_samples is not None and len(texts) >= n_samples:
                break
        if not texts:
            raise InputError("the corpus holds no non-empty text")
        return Corpus("iterable", "texts", _sha_texts(texts), lambda: iter(texts))
    raise InputError(f"corpus must be a path, a dataset name or an iterable of strings, "
                     f"not {type(corpus).__name__}")


def take(corpus: Corpus, n_samples: int | None) -> Iterator[str]:
    """The first ``n_samples`` non-empty texts (all when None)."""
    n = 0
    for t in _nonempty(corpus.texts()):
        if n_samples is not None and n >= n_samples:
            return
        yield t
        n += 1
