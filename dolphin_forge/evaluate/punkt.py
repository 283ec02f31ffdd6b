"""NLTK's Punkt sentence model for IFEval, offline.

The harness' IFEval checks count sentences and words with NLTK, which needs the `punkt_tab` English model. The
harness downloads it on import; these machines reach no download server, and the model is on no package registry
we use. When it is not installed we train one with NLTK's own unsupervised `PunktTrainer` (the algorithm behind the
official model) on English Wikipedia text from the local eval data (wikitext-2), and install it in our cache in
NLTK's `punkt_tab` format. Only two of IFEval's 25 instruction types depend on it (sentence counts and capital-word
counts), and a Punkt model mostly differs in its abbreviation list, so scores can differ from a run with the official
model only on those instructions, and rarely. The official model is always preferred when installed.
"""

from __future__ import annotations

from pathlib import Path

from dolphin_forge.errors import ForgeError

#: The training text, relative to the eval data folder (`../shared/data/eval`).
TRAINING_TEXT = "wikitext2_test.raw"


def punkt_dir() -> Path:
    """Where our trained model lives: an NLTK data root inside the dolphin-forge cache."""
    from dolphin_forge.models.default import cache_dir

    return cache_dir().parent / "nltk_data"


def _installed() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        return False
    return True


def train_punkt(text: str, target: Path) -> None:
    """Train an English Punkt model on `text` and write it to `target` in NLTK's punkt_tab file layout."""
    from nltk.tabdata import TabEncoder
    from nltk.tokenize.punkt import PunktTrainer

    trainer = PunktTrainer()
    trainer.train(text, finalize=True)
    params, encode = trainer.get_params(), TabEncoder()
    target.mkdir(parents=True, exist_ok=True)
    files = {
        "collocations.tab": encode.tups2tab(params.collocations),
        "sent_starters.txt": encode.set2txt(params.sent_starters),
        "abbrev_types.txt": encode.set2txt(params.abbrev_types),
        "ortho_context.tab": encode.ivdict2tab(params.ortho_context),
    }
    for name, content in files.items():
        (target / name).write_text(content, encoding="utf-8", newline="")


def _find_ours() -> Path:
    """Our cache folder added to NLTK's data roots (once), so that a model trained earlier is found."""
    import nltk

    root = punkt_dir()
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    return root


def check_punkt(data_dir: Path | None) -> None:
    """Refuse, in one line, a run whose IFEval could get no Punkt model: called before a model is loaded."""
    _find_ours()
    if not _installed() and (data_dir is None or not (data_dir / TRAINING_TEXT).is_file()):
        raise ForgeError(
            "ifeval: NLTK's punkt_tab model is not installed and cannot be downloaded here; install it "
            f"(python -m nltk.downloader punkt_tab) or put {TRAINING_TEXT} in eval.data_dir to train a substitute"
        )


def ensure_punkt(data_dir: Path | None) -> str | None:
    """Make `punkt_tab/english` findable by NLTK; returns a note for the user when our substitute is used."""
    root = _find_ours()
    if _installed():
        return _substitute_note() if _ours_in_use() else None
    check_punkt(data_dir)
    assert data_dir is not None  # check_punkt refused a run without the training text
    train_punkt((data_dir / TRAINING_TEXT).read_text(encoding="utf-8"), root / "tokenizers" / "punkt_tab" / "english")
    return _substitute_note()


def _ours_in_use() -> bool:
    """True when the model NLTK finds is our substitute rather than an official install."""
    import nltk

    return str(nltk.data.find("tokenizers/punkt_tab/english/")).startswith(str(punkt_dir()))


def _substitute_note() -> str:
    return (
        f"ifeval: NLTK's official punkt_tab model is not installed; sentence counts use a Punkt model trained "
        f"offline on {TRAINING_TEXT} (NLTK_DATA={punkt_dir()} gives lm_eval run directly the same model)"
    )
