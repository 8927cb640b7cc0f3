"""Translation scores of detokenized text, from lists of lines or from files.

Scoring works on text, not on model outputs, so that any system's
translations (ours, a baseline's, a published output file) are scored the
same way: one hypothesis line per source sentence, and one or more
reference streams of the same length. Every score here is higher-is-better
(`HIGHER_IS_BETTER`).

Two BLEU figures are reported:

- `bleu`: sacreBLEU's corpus BLEU on the detokenized text with its default
  `13a` tokenizer (mteval-v13a), the comparable figure; `bleu_signature`
  says how it was computed.
- `bleu_tokenized`: the convention of the paper's comparison systems (GNMT,
  and tensor2tensor's `get_ende_bleu.sh` for WMT'14 En->De): BLEU on
  tokenized text with hyphenated compounds split,
  `rich-text -> rich ##AT##-##AT## text`. Here both sides are tokenized
  with sacreBLEU's `13a` tokenizer (tensor2tensor uses Moses'
  `tokenizer.perl -l de`, which differs on some punctuation and escapes),
  then every match of `(\\S)-(\\S)` is rewritten `\\1 ##AT##-##AT## \\2`
  left to right without overlaps, exactly as tensor2tensor's Perl one-liner
  `s{(\\S)-(\\S)}{$1 ##AT##-##AT## $2}g` does (`rich-text-Format` has
  both hyphens split, but a one-character middle is consumed by the first
  match: `a-b-c` becomes `a ##AT##-##AT## b-c`), and BLEU is computed with
  `tokenize="none"` (whitespace split). Splitting compounds turns one unmatched token into
  three, two of which often match, so this figure is usually higher than
  `bleu`; it is reported only to compare with papers that used it.
  `bleu_tokenized_convention` states it in one line.

chrF is sacreBLEU's `CHRF()` (character 6-grams, beta 2) on the
detokenized text.

Example:

>>> tokenize_compounds("Das rich-text-Format, bitte.")
'Das rich ##AT##-##AT## text ##AT##-##AT## Format , bitte .'
>>> result = score(["the cat sat on the mat"], [["the cat sat on the mat"]])
>>> round(result["bleu"], 6), result["sentences"], result["references"]
(100.0, 1, 1)
"""

import os
import re

import sacrebleu
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from keras_moe.pipelines.data import corpora

# Every score is higher-is-better (for model selection and early stopping).
HIGHER_IS_BETTER = {"bleu": True, "bleu_tokenized": True, "chrf": True}

# tensor2tensor's get_ende_bleu.sh: perl -ple 's{(\S)-(\S)}{$1 ##AT##-##AT## $2}g'.
# Python's re.sub matches left to right without overlaps, like Perl's s///g.
_COMPOUND = re.compile(r"(\S)-(\S)")
_TOKENIZER_13A = Tokenizer13a()


def tokenize_compounds(line):
    """`line` tokenized with sacreBLEU's `13a` tokenizer, hyphenated compounds split.

    Args:
        line: str, one detokenized sentence.

    Returns:
        str, space-separated tokens; each `x-y` with non-space `x` and `y`
        becomes `x ##AT##-##AT## y`, matched left to right without
        overlaps as tensor2tensor's Perl does (`a-b-c` gives
        `a ##AT##-##AT## b-c`: the first match consumed the `b`).
    """
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", _TOKENIZER_13A(line))


def _check_lines(name, lines):
    if isinstance(lines, str) or not all(isinstance(line, str) for line in lines):
        raise ValueError(f"`{name}` must be a list of str (one sentence per item).")


def score(hypotheses, references, *, target_language="de"):
    """BLEU, tokenized BLEU and chrF of `hypotheses` against reference streams.

    Args:
        hypotheses: list of str, one detokenized translation per sentence.
        references: list of reference streams, each a list of str of the
            same length as `hypotheses` (stream `r`'s item `i` is a
            reference for sentence `i`).
        target_language: str, the target language code; passed to
            sacreBLEU as `trg_lang`, which picks its default tokenizer for
            `bleu` (`13a`, except `zh`, `ja`, `ko`).

    Returns:
        dict: `bleu` (float, 0 to 100), `bleu_signature` (str, sacreBLEU's
        signature, e.g. `nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|
        version:2.6.0`), `bleu_tokenized` (float), `bleu_tokenized_convention`
        (str, one line), `chrf` (float), `chrf_signature` (str),
        `sentences` (int) and `references` (int, the number of streams).

    Raises:
        ValueError: no hypotheses, no reference stream, a stream whose
            length differs from the hypotheses' (both counts named), or
            items that are not str.
    """
    _check_lines("hypotheses", hypotheses)
    hypotheses = list(hypotheses)
    if not hypotheses:
        raise ValueError("`hypotheses` is empty: there is nothing to score.")
    if isinstance(references, str) or not references:
        raise ValueError(
            "`references` must be a non-empty list of reference streams (lists of str)."
        )
    references = [list(stream) for stream in references]
    for r, stream in enumerate(references):
        _check_lines(f"references[{r}]", stream)
        if len(stream) != len(hypotheses):
            raise ValueError(
                f"Reference stream {r} has {len(stream)} sentences but there are "
                f"{len(hypotheses)} hypotheses; every stream needs one line per hypothesis."
            )
    if not isinstance(target_language, str) or not target_language:
        raise ValueError(
            "`target_language` must be a language code such as 'de'. "
            f"Received: target_language={target_language!r}"
        )

    bleu = sacrebleu.BLEU(trg_lang=target_language)
    bleu_score = bleu.corpus_score(hypotheses, references)
    chrf = sacrebleu.CHRF()
    chrf_score = chrf.corpus_score(hypotheses, references)
    tokenized = sacrebleu.BLEU(tokenize="none")
    tokenized_score = tokenized.corpus_score(
        [tokenize_compounds(h) for h in hypotheses],
        [[tokenize_compounds(line) for line in stream] for stream in references],
    )
    convention = (
        "13a-tokenized, compounds split a-b -> a ##AT##-##AT## b (tensor2tensor "
        f"get_ende_bleu.sh), then BLEU {tokenized.get_signature()}"
    )
    return {
        "bleu": bleu_score.score,
        "bleu_signature": str(bleu.get_signature()),
        "bleu_tokenized": tokenized_score.score,
        "bleu_tokenized_convention": convention,
        "chrf": chrf_score.score,
        "chrf_signature": str(chrf.get_signature()),
        "sentences": len(hypotheses),
        "references": len(references),
    }


def read_lines(path):
    """The lines of UTF-8 file `path` (`.gz` too), the line ending removed, empty lines kept.

    Line `i` is sentence `i`: an empty line is an empty sentence, not
    skipped. Lines end at `\\n` only, and only the terminator (`\\n` or
    `\\r\\n`) is removed: other whitespace, and separators such as
    U+2028 that `str.splitlines` would split at, stay in the sentence. A
    last line without a newline counts; a byte order mark is dropped.

    Raises:
        FileNotFoundError: naming `path` when it does not exist.
        ValueError: naming the file and line of a byte that is not UTF-8.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such file to score: {path}")
    return [line for _, line in corpora.numbered_lines(path)]


def score_files(hypothesis_path, reference_paths, *, target_language="de"):
    """`score` of a hypothesis file against one or more reference files.

    Args:
        hypothesis_path: path of a UTF-8 file, one translation per line.
        reference_paths: a path or a list of paths of UTF-8 reference
            files, each with as many lines as the hypothesis file.
        target_language: as for `score`.

    Returns:
        `score`'s dict, plus `hypotheses_file` (str) and `reference_files`
        (list of str), the paths as given.

    Raises:
        FileNotFoundError: a file is missing (named).
        ValueError: a reference file's line count differs from the
            hypothesis file's (both files and both counts named), or the
            hypothesis file is empty.
    """
    if isinstance(reference_paths, (str, os.PathLike)):
        reference_paths = [reference_paths]
    reference_paths = [os.fspath(p) for p in reference_paths]
    if not reference_paths:
        raise ValueError("`reference_paths` is empty: give at least one reference file.")
    hypothesis_path = os.fspath(hypothesis_path)
    hypotheses = read_lines(hypothesis_path)
    references = []
    for path in reference_paths:
        lines = read_lines(path)
        if len(lines) != len(hypotheses):
            raise ValueError(
                f"{path} has {len(lines)} lines but {hypothesis_path} has {len(hypotheses)}; "
                "a reference file needs one line per hypothesis line."
            )
        references.append(lines)
    if not hypotheses:
        raise ValueError(f"{hypothesis_path} is empty: there is nothing to score.")
    result = score(hypotheses, references, target_language=target_language)
    result["hypotheses_file"] = hypothesis_path
    result["reference_files"] = reference_paths
    return result
