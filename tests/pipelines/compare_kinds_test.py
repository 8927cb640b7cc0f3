"""`keras-moe compare` refuses to put language-model and translation runs in one table.

A language model's perplexity is per word, a translation model's per target
WordPiece token: side by side, the two read as comparable and are not.
"""

import pytest

from keras_moe.pipelines import cli
from keras_moe.pipelines.compare import compare, read_run, run_kind
from tests.pipelines.compare_test import write_run

LM = {"data.seq_len": 35}
TRANSLATION = {"decode.beam_width": 4}


def test_kinds_from_config_or_results(tmp_path):
    lm = write_run(tmp_path / "lm", [{"val_perplexity": 120.0}], config=LM)
    mt = write_run(tmp_path / "mt", [{"val_perplexity": 6.0}], config=TRANSLATION)
    by_results = write_run(tmp_path / "old", [{"val_perplexity": 7.0}],
                           results={"valid": {"convention": "perplexity per target WordPiece"}})
    unknown = write_run(tmp_path / "bare", [{"val_perplexity": 7.0}])
    assert [run_kind(read_run(d)) for d in (lm, mt, by_results, unknown)] == [
        "lm", "translation", "translation", None]


def test_mixing_an_lm_and_a_translation_run_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KERAS_MOE_NO_REEXEC", "1")  # no re-exec of the test process
    lm = write_run(tmp_path / "lm", [{"val_perplexity": 120.0}], config=LM)
    mt = write_run(tmp_path / "mt", [{"val_perplexity": 6.0}], config=TRANSLATION)
    with pytest.raises(ValueError, match=r"language-model runs \(lm: perplexity per word\) "
                                         r"with translation runs \(mt: perplexity per target"):
        compare([lm, mt])
    assert cli.main(["compare", lm, mt]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compare them separately" in err[0]
    # Runs of one kind (or of no known kind) still compare.
    lm2 = write_run(tmp_path / "lm2", [{"val_perplexity": 110.0}], config=LM)
    bare = write_run(tmp_path / "bare", [{"val_perplexity": 100.0}])
    assert compare([lm, lm2, bare])["labels"] == ["lm", "lm2", "bare"]
