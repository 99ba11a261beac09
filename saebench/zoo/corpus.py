"""The bundled corpus: text that every Debian machine can have offline.

Sources: the King James Bible (package bible-kjv), fortunes (package fortunes), the Jargon File
(package jargon-text) and the Python standard library's own source. Each document gets a stable
id; the held-out split is chosen by a hash of that id, so it does not move when a source grows.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
import subprocess
import sysconfig
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from saebench.errors import DataError

HELDOUT_PERCENT = 5
FORTUNE_DIR = Path("/usr/share/games/fortunes")
JARGON_FILE = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
SETUP_HINT = "run scripts/setup (it installs the Debian packages bible-kjv, fortunes and jargon-text)"


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str

    @property
    def split(self) -> str:
        digest = int(hashlib.sha1(self.doc_id.encode()).hexdigest()[:8], 16)
        return "test" if digest % 100 < HELDOUT_PERCENT else "train"


def _bible() -> Iterator[Document]:
    if shutil.which("bible") is None:
        raise DataError(f"the `bible` command is missing: {SETUP_HINT}")
    out = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    chapters: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"^(\w+?)(\d+):(\d+) (.*)$", line)
        if m:
            chapters.setdefault(f"{m.group(1)}{m.group(2)}", []).append(m.group(4))
    for chapter, verses in chapters.items():
        yield Document(f"bible/{chapter}", "\n".join(verses))


def _fortunes() -> Iterator[Document]:
    if not FORTUNE_DIR.is_dir():
        raise DataError(f"{FORTUNE_DIR} is missing: {SETUP_HINT}")
    for path in sorted(FORTUNE_DIR.iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_dir() or path.is_symlink():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for i, fortune in enumerate(text.split("\n%\n")):
            if fortune.strip():
                yield Document(f"fortunes/{path.name}/{i}", fortune.strip("\n"))


def _jargon() -> Iterator[Document]:
    if not JARGON_FILE.exists():
        raise DataError(f"{JARGON_FILE} is missing: {SETUP_HINT}")
    text = gzip.decompress(JARGON_FILE.read_bytes()).decode("utf-8", errors="replace")
    entries = re.split(r"\n(?=   :[^\n:]+:)", text)
    for i, entry in enumerate(entries):
        if entry.strip():
            yield Document(f"jargon/{i}", textwrap.dedent(entry).strip("\n"))


def _python_stdlib() -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip.intersection(rel.parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield Document(f"python/{rel.as_posix()}", text)


SOURCES = {"bible": _bible, "fortunes": _fortunes, "jargon": _jargon, "python": _python_stdlib}


def iter_documents(split: str = "train", sources: tuple[str, ...] = tuple(SOURCES)) -> Iterator[Document]:
    """Documents of one split ("train", "test" or "all"), in a fixed order."""
    if split not in ("train", "test", "all"):
        raise DataError(f"unknown split {split!r} of the bundled corpus: use train, test or all")
    for name in sources:
        for doc in SOURCES[name]():
            if split == "all" or doc.split == split:
                yield doc
