"""Scorers on files: sacreBLEU's figures exactly, tokenized BLEU from hand counts."""

import math
import re

import pytest
import sacrebleu

from keras_moe.pipelines.translate import scoring

HYPOTHESES = [
    "Das Haus ist klein.",
    "",  # an empty translation is still sentence 2
    "Der Mann liest ein rich-text Buch, sagt er.",
    "Es regnet heute in Berlin.",
]
REFERENCE_A = [
    "Das Haus ist sehr klein.",
    "Guten Morgen.",
    "Der Mann liest ein rich-text-Buch, sagt er.",
    "Heute regnet es in Berlin.",
]
REFERENCE_B = [
    "Das Gebäude ist klein.",
    "Morgen!",
    "Er sagt, der Mann lese ein Buch.",
    "Es regnet heute in Berlin.",
]


def _write(path, lines, newline="\n", final_newline=True):
    text = newline.join(lines) + (newline if final_newline else "")
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.fixture
def files(tmp_path):
    return (
        _write(tmp_path / "hyp.de", HYPOTHESES),
        _write(tmp_path / "ref_a.de", REFERENCE_A),
        # CRLF and no final newline: the same four sentences.
        _write(tmp_path / "ref_b.de", REFERENCE_B, newline="\r\n", final_newline=False),
    )


def test_score_files_equals_sacrebleu_on_the_same_lines_one_reference(files):
    hyp, ref_a, _ = files
    result = scoring.score_files(hyp, [ref_a])
    expected = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCE_A])
    assert result["bleu"] == pytest.approx(expected.score, abs=1e-9)
    assert 0 < result["bleu"] < 100
    bleu = sacrebleu.BLEU()
    bleu.corpus_score(HYPOTHESES, [REFERENCE_A])
    assert result["bleu_signature"] == str(bleu.get_signature())
    assert result["bleu_signature"] == (
        f"nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{sacrebleu.__version__}"
    )
    chrf = sacrebleu.CHRF()
    assert result["chrf"] == pytest.approx(
        chrf.corpus_score(HYPOTHESES, [REFERENCE_A]).score, abs=1e-9
    )
    assert result["chrf_signature"] == str(chrf.get_signature())
    assert (result["sentences"], result["references"]) == (4, 1)
    assert result["hypotheses_file"] == str(hyp)
    assert result["reference_files"] == [str(ref_a)]


def test_score_files_two_references(files):
    hyp, ref_a, ref_b = files
    result = scoring.score_files(str(hyp), [str(ref_a), str(ref_b)])
    streams = [REFERENCE_A, REFERENCE_B]
    expected = sacrebleu.corpus_bleu(HYPOTHESES, streams)
    assert result["bleu"] == pytest.approx(expected.score, abs=1e-9)
    # The second reference matches sentence 4 exactly: BLEU rises.
    assert result["bleu"] > sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCE_A]).score
    assert result["bleu_signature"].startswith("nrefs:2|")
    assert result["chrf"] == pytest.approx(
        sacrebleu.corpus_chrf(HYPOTHESES, streams).score, abs=1e-9
    )
    assert result["references"] == 2
    assert result["reference_files"] == [str(ref_a), str(ref_b)]
    # One path instead of a list is one reference.
    assert scoring.score_files(hyp, ref_a)["bleu"] == scoring.score_files(hyp, [ref_a])["bleu"]


def test_tokenized_bleu_from_hand_counts():
    hypothesis = "the rich text format is good"
    reference = "the rich-text format is good"
    result = scoring.score([hypothesis], [[reference]])
    # Detokenized (13a keeps `rich-text` whole): hypothesis 6 tokens,
    # reference 5 (the rich-text format is good).
    #   1-grams: the, format, is, good match          4 / 6
    #   2-grams: format is, is good                   2 / 5
    #   3-grams: format is good                       1 / 4
    #   4-grams: none; sacreBLEU's exp smoothing      1 / (2 * 3)
    #   brevity: 6 >= 5, no penalty.
    detok = (4 / 6 * 2 / 5 * 1 / 4 * 1 / 6) ** 0.25 * 100
    assert result["bleu"] == pytest.approx(detok, abs=1e-9)
    # Tokenized: the reference becomes 7 tokens,
    # the rich ##AT##-##AT## text format is good.
    #   1-grams: all six hypothesis tokens match       6 / 6
    #   2-grams: the rich, text format, format is, is good   4 / 5
    #   3-grams: text format is, format is good        2 / 4
    #   4-grams: text format is good                   1 / 3
    #   brevity: 6 < 7, exp(1 - 7/6).
    tok = math.exp(1 - 7 / 6) * (1 * 4 / 5 * 2 / 4 * 1 / 3) ** 0.25 * 100
    assert result["bleu_tokenized"] == pytest.approx(tok, abs=1e-9)
    assert (round(result["bleu"], 2), round(result["bleu_tokenized"], 2)) == (32.47, 51.15)
    convention = result["bleu_tokenized_convention"]
    assert "\n" not in convention and "##AT##-##AT##" in convention
    assert convention.endswith(
        f"nrefs:1|case:mixed|eff:no|tok:none|smooth:exp|version:{sacrebleu.__version__}"
    )


def test_tokenize_compounds_follows_tensor2tensor():
    # 13a splits the punctuation; each (\S)-(\S) is rewritten.
    assert scoring.tokenize_compounds("Ein E-Mail-Konto, bitte.") == (
        "Ein E ##AT##-##AT## Mail ##AT##-##AT## Konto , bitte ."
    )
    # Non-overlapping, as Perl's s///g: the first match consumed the "b".
    assert scoring.tokenize_compounds("a-b-c") == "a ##AT##-##AT## b-c"
    # 13a already splits a dash after a digit; a free-standing dash stays.
    assert scoring.tokenize_compounds("3-4 Tage - nicht mehr") == "3 - 4 Tage - nicht mehr"


def test_target_language_picks_sacrebleus_tokenizer():
    result = scoring.score(["我爱你"], [["我爱你"]], target_language="zh")
    assert "|tok:zh|" in result["bleu_signature"]
    assert "|tok:13a|" in scoring.score(["a b"], [["a b"]], target_language="en")[
        "bleu_signature"
    ]


def test_read_lines_keeps_empty_lines_and_strips_only_the_newline(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_bytes("  eins \n\nzwei\u2028drei\r\nvier".encode())
    assert scoring.read_lines(path) == ["  eins ", "", "zwei\u2028drei", "vier"]
    path.write_bytes(b"\n")
    assert scoring.read_lines(path) == [""]
    path.write_bytes(b"")
    assert scoring.read_lines(path) == []
    path.write_bytes(b"eins\r\r\n\xef\xbb\xbfzwei\n")  # only one ending; an inner BOM is text
    assert scoring.read_lines(path) == ["eins\r", "\ufeffzwei"]


def test_read_lines_names_the_line_that_is_not_utf8(tmp_path):
    path = tmp_path / "hyp.txt"
    path.write_bytes("gut\nGr\u00fc\u00dfe\n".encode("utf-8") + b"caf\xe9\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: not valid UTF-8")):
        scoring.read_lines(path)


def test_score_errors():
    with pytest.raises(ValueError, match="`hypotheses` is empty"):
        scoring.score([], [[]])
    with pytest.raises(ValueError, match=r"Reference stream 1 has 1 sentences but there are 2 hyp"):
        scoring.score(["a", "b"], [["a", "b"], ["a"]])
    with pytest.raises(ValueError, match="`references` must be a non-empty list"):
        scoring.score(["a"], [])
    with pytest.raises(ValueError, match="`references` must be a non-empty list"):
        scoring.score(["a"], "a")
    with pytest.raises(ValueError, match=r"`hypotheses` must be a list of str"):
        scoring.score("a b", [["a b"]])
    with pytest.raises(ValueError, match=r"`references\[0\]` must be a list of str"):
        scoring.score(["a"], [[None]])
    with pytest.raises(ValueError, match="Received: target_language=''"):
        scoring.score(["a"], [["a"]], target_language="")


def test_score_files_errors(files, tmp_path):
    hyp, ref_a, _ = files
    short = _write(tmp_path / "short.de", REFERENCE_A[:3])
    with pytest.raises(ValueError) as info:
        scoring.score_files(hyp, [ref_a, short])
    assert str(info.value) == (
        f"{short} has 3 lines but {hyp} has 4; a reference file needs one line per "
        "hypothesis line."
    )
    missing = tmp_path / "missing.de"
    with pytest.raises(FileNotFoundError, match="missing.de"):
        scoring.score_files(missing, [ref_a])
    with pytest.raises(FileNotFoundError, match="missing.de"):
        scoring.score_files(hyp, [ref_a, missing])
    empty, empty_ref = _write(tmp_path / "empty.de", [], final_newline=False), tmp_path / "e.ref"
    empty_ref.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.de is empty: there is nothing to score"):
        scoring.score_files(empty, [empty_ref])
    with pytest.raises(ValueError, match="`reference_paths` is empty"):
        scoring.score_files(hyp, [])
