"""Export a translation model and its WordPiece vocabulary as one text-to-text SavedModel.

The exported SavedModel translates raw text with the whole way from text to
text inside the graph, so serving it needs TensorFlow and TensorFlow Text
only (neither Keras nor `keras_moe`). Its `serving_default` signature takes
`sentences`, a 1-D `tf.string` tensor, and returns `translations` (1-D
`tf.string`) and `scores` (float32 `[b]`). In the graph, as in the Python
path `vocabulary.decode(beam_search(model, vocabulary.encode_lines(...)))`:

1. words: each sentence split at whitespace exactly as Python's
   `str.split()` splits it (every character `str.isspace()` accepts);
2. source ids: each word's WordPiece pieces (the vocabulary's own
   tokenizer, `tensorflow_text.FastWordpieceTokenizer`), then `<eos>`, as
   `WordPieceVocabulary.encode_lines` gives them; at most
   `max_source_pieces` ids per sentence (a longer one keeps its first
   pieces and its `<eos>`), padded with 0 to the batch's longest;
3. target ids: `keras_moe.models.decoding.beam_search` (`greedy_decode`
   when `beam_width=1`) with `<eos>` (id 2) as the decoder's first input
   and as its end token, the translation pipeline's convention;
4. text: the ids before the first `<eos>`, `<pad>` left out, `##` pieces
   joined to the piece before them and words joined by one space (a `##`
   piece that starts a sentence stays as it is, `<unk>` is written
   `<unk>`), as `WordPieceVocabulary.decode`.

Step 4 is a few string ops on the vocabulary's tokens rather than
`FastWordpieceTokenizer.detokenize`: it needs no detokenization tables in
the tokenizer, does not depend on which tokenizer the vocabulary uses
(FastWordpieceTokenizer or its fallback), and follows `decode` rule for
rule. Ids outside the vocabulary fail there, as `decode` refuses them.

Two more signatures run steps 2 and 4 alone, for checks and for clients
that tokenize themselves: `tokenize` (`sentences` -> `source_ids`, int32
`[b, s]`) and `detokenize` (`ids`, int32 `[b, L]` -> `translations`).

Next to the SavedModel, `translator.json` records the decoding settings and
the vocabulary size, and `wordpiece.txt` the vocabulary itself.

Example:

```python
export_translator(model, vocabulary, "exports/en_de", beam_width=4)

# Anywhere with TensorFlow and TensorFlow Text installed:
import tensorflow as tf
import tensorflow_text  # registers the tokenizer ops

translator = tf.saved_model.load("exports/en_de")
out = translator.signatures["serving_default"](sentences=tf.constant(["Hello, world!"]))
out["translations"], out["scores"]

# or, in Python with keras_moe:
translate = load_translator("exports/en_de")
translate(["Hello, world!"])  # ['Hallo, Welt!']
```
"""

import functools
import json
import os
import shutil
import sys
import uuid

import keras
import tensorflow as tf

from keras_moe.models.decoding import beam_search, greedy_decode
from keras_moe.pipelines.data.wordpiece import JOINER, WordPieceVocabulary
from keras_moe.validation import check_int, check_number

SETTINGS_FILENAME = "translator.json"
FORMAT_VERSION = 1
# The translation pipeline's contract: sources end with <eos>, and the
# decoder starts from <eos> too (there is no separate <bos>).
PAD_ID, EOS_ID = 0, 2
BOS_ID = EOS_ID


def export_translator(model, vocabulary, export_dir, *, beam_width=4, alpha=0.6, beta=0.2,
                      max_length_ratio=2.0, min_extra=10, max_source_pieces=256):
    """Write a SavedModel that translates raw sentences, tokenization and search included.

    The SavedModel is written to a temporary folder beside `export_dir`
    and moved into place once complete, so a failed export leaves nothing
    behind. See the module docstring for what the graph does and for the
    signatures it serves.

    Args:
        model: a built `keras_moe.models.TranslationModel` (anything with
            `encode`, `initial_decoder_state` and `decode_step`) whose
            vocabulary is `vocabulary`.
        vocabulary: the `WordPieceVocabulary` shared by source and target.
        export_dir: the folder to create; it must not exist or be empty.
        beam_width: int >= 1; 1 decodes greedily.
        alpha: float >= 0, GNMT's length normalisation.
        beta: float >= 0, GNMT's coverage penalty.
        max_length_ratio: float > 0; a sentence of `s` source ids (`<eos>`
            included) gets at most `floor(max_length_ratio * s) + min_extra`
            target ids.
        min_extra: int >= 0.
        max_source_pieces: int >= 1, the most source ids a sentence is
            given, its `<eos>` included; longer sentences are cut.

    Returns:
        `export_dir`, as a string.

    Raises:
        ValueError: for a bad argument, or when the model's `vocab_size`
            is not the vocabulary's size.
        FileExistsError: when `export_dir` exists and is not an empty
            folder (nothing of it is touched).
    """
    for name in ("encode", "initial_decoder_state", "decode_step"):
        if not callable(getattr(model, name, None)):
            raise ValueError(
                f"`model` must be a translation model (with `{name}`). Received: model={model!r}"
            )
    if not isinstance(vocabulary, WordPieceVocabulary):
        raise ValueError(
            "`vocabulary` must be a WordPieceVocabulary. "
            f"Received: vocabulary of type {type(vocabulary).__name__}"
        )
    model_vocab_size = getattr(model, "vocab_size", len(vocabulary))
    if model_vocab_size != len(vocabulary):
        raise ValueError(
            f"The model's `vocab_size` ({model_vocab_size}) must equal the vocabulary's size. "
            f"Received: len(vocabulary)={len(vocabulary)}"
        )
    check_int("beam_width", beam_width, 1)
    check_int("min_extra", min_extra, 0)
    check_int("max_source_pieces", max_source_pieces, 1)
    check_number("alpha", alpha, inclusive=True)
    check_number("beta", beta, inclusive=True)
    check_number("max_length_ratio", max_length_ratio)
    export_dir = os.fspath(export_dir)
    _check_free(export_dir)

    settings = {
        "beam_width": beam_width, "alpha": float(alpha), "beta": float(beta),
        "max_length_ratio": float(max_length_ratio), "min_extra": min_extra,
        "max_source_pieces": max_source_pieces,
    }
    # The vocabulary's own tokenizer (FastWordpieceTokenizer, or its
    # fallback), so that the graph's pieces are `encode_lines`'s.
    tokenizer, tokenizer_name = vocabulary.build_tokenizer()
    graph = _TranslatorGraph(model, tokenizer, vocabulary.tokens, settings)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.track(tokenizer)  # tables of the fallback tokenizer, if any
    sentences = tf.TensorSpec([None], tf.string, name="sentences")
    archive.add_endpoint("serving_default", graph.translate, input_signature=[sentences])
    archive.add_endpoint("tokenize", graph.tokenize, input_signature=[sentences])
    archive.add_endpoint("detokenize", graph.detokenize,
                         input_signature=[tf.TensorSpec([None, None], tf.int32, name="ids")])

    manifest = {
        "format_version": FORMAT_VERSION,
        "signatures": {
            "serving_default": {"inputs": ["sentences"], "outputs": ["translations", "scores"]},
            "tokenize": {"inputs": ["sentences"], "outputs": ["source_ids"]},
            "detokenize": {"inputs": ["ids"], "outputs": ["translations"]},
        },
        "decoder": "beam_search" if beam_width > 1 else "greedy_decode",
        **settings,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "vocab_size": len(vocabulary),
        "tokenizer": tokenizer_name,
        "model": {"class": type(model).__name__, "name": getattr(model, "name", None)},
    }
    target = os.path.abspath(export_dir)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    # A plain `mkdir` (not `tempfile.mkdtemp`, which makes it private):
    # the export gets the user's usual permissions.
    staging = os.path.join(parent, f".{os.path.basename(target)}.partial-{uuid.uuid4().hex}")
    os.mkdir(staging)
    try:
        archive.write_out(staging, verbose=False)
        vocabulary.save(staging)
        with open(os.path.join(staging, SETTINGS_FILENAME), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        _check_free(export_dir)  # again: the export took a while
        if os.path.isdir(target):
            os.rmdir(target)  # empty; fails rather than delete anything
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return export_dir


def load_translator(export_dir):
    """Load an exported translator as a Python function from sentences to translations.

    Uses only `tf.saved_model.load` (and `tensorflow_text` for its ops);
    neither the model's classes nor `keras_moe` are needed by the graph.

    Args:
        export_dir: a folder written by `export_translator`.

    Returns:
        A function `translate(sentences) -> list[str]` taking a list (or
        any iterable) of `str`; `translate.saved_model` is the loaded
        SavedModel (its `signatures` also give the scores).

    Raises:
        FileNotFoundError: naming `export_dir` when it holds no SavedModel.
    """
    import tensorflow_text  # noqa: F401  registers the WordPiece ops before loading

    export_dir = os.fspath(export_dir)
    if not os.path.isfile(os.path.join(export_dir, "saved_model.pb")):
        raise FileNotFoundError(f"No SavedModel (saved_model.pb) in {export_dir}")
    saved_model = tf.saved_model.load(export_dir)

    def translate(sentences):
        """Translations of `sentences`, a list of `str`, in order."""
        if isinstance(sentences, (str, bytes)):
            raise ValueError(
                "`sentences` must be a list of strings, not one string. "
                f"Received: sentences={sentences!r}"
            )
        sentences = list(sentences)
        if not sentences:
            return []
        # `saved_model` (not only its signature) stays referenced: the
        # signature's variables live as long as the loaded object.
        serve = saved_model.signatures["serving_default"]
        out = serve(sentences=tf.constant(sentences, tf.string, shape=[len(sentences)]))
        return [text.decode("utf-8") for text in out["translations"].numpy()]

    translate.saved_model = saved_model
    return translate


class _TranslatorGraph:
    """The signatures' functions: plain Python, traced by the export archive."""

    def __init__(self, model, tokenizer, tokens, settings):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        # Python values; the tensors are made while tracing, as graph constants.
        self.tokens = list(tokens)
        joined = [t.startswith(JOINER) and len(t) > len(JOINER) for t in self.tokens]
        self.joins_word = joined
        self.suffixes = [t[len(JOINER):] if j else t for t, j in zip(self.tokens, joined,
                                                                     strict=True)]

    def translate(self, sentences):
        source_ids = self.tokenize(sentences)["source_ids"]

        def search():
            ids, scores = self._search(source_ids)
            return self.detokenize(ids)["translations"], scores

        def nothing():  # the search cannot run on an empty batch
            return tf.zeros([0], tf.string), tf.zeros([0], tf.float32)

        translations, scores = tf.cond(tf.size(sentences) > 0, search, nothing)
        return {"translations": translations, "scores": scores}

    def tokenize(self, sentences):
        # Every Python whitespace character becomes a space, which
        # `tf.strings.split` (ASCII whitespace only) then splits at.
        words = tf.strings.split(tf.strings.regex_replace(sentences, _whitespace_class(), " "))
        pieces = tf.cast(self.tokenizer.tokenize(words.flat_values), tf.int32)  # [w, (p)]
        pieces = words.with_flat_values(pieces).merge_dims(1, 2)  # [b, (p)]
        pieces = pieces[:, : self.settings["max_source_pieces"] - 1]
        eos = tf.RaggedTensor.from_tensor(
            tf.fill([pieces.nrows(), 1], EOS_ID), row_splits_dtype=pieces.row_splits.dtype
        )
        source_ids = tf.concat([pieces, eos], axis=1).to_tensor(default_value=PAD_ID)
        return {"source_ids": source_ids}

    def _search(self, source_ids):
        s = self.settings
        if s["beam_width"] == 1:
            return greedy_decode(self.model, source_ids, bos_id=BOS_ID, eos_id=EOS_ID,
                                 max_length_ratio=s["max_length_ratio"], min_extra=s["min_extra"])
        return beam_search(self.model, source_ids, bos_id=BOS_ID, eos_id=EOS_ID,
                           beam_width=s["beam_width"], alpha=s["alpha"], beta=s["beta"],
                           max_length_ratio=s["max_length_ratio"], min_extra=s["min_extra"])

    def detokenize(self, ids):
        ids = tf.convert_to_tensor(ids, tf.int32)
        # Ids before the first <eos>, without padding: [b, (p)].
        before_end = tf.equal(tf.cumsum(tf.cast(tf.equal(ids, EOS_ID), tf.int32), axis=1), 0)
        pieces = tf.ragged.boolean_mask(ids, before_end & tf.not_equal(ids, PAD_ID))
        flat, rows = pieces.flat_values, pieces.value_rowids()
        position = tf.range(tf.size(flat, out_type=rows.dtype)) - tf.gather(pieces.row_starts(),
                                                                            rows)
        # A `##` piece joins the word before it, if any; other pieces start
        # a word, after a space unless they start the sentence.
        joins = tf.gather(tf.constant(self.joins_word), flat) & (position > 0)
        text = tf.where(joins, tf.gather(tf.constant(self.suffixes), flat),
                        tf.gather(tf.constant(self.tokens), flat))
        text = tf.where(joins | tf.equal(position, 0), text, tf.strings.join([" ", text]))
        translations = tf.strings.unsorted_segment_join(text, rows, pieces.nrows())
        return {"translations": translations}


def _check_free(export_dir):
    """Raise unless `export_dir` is absent or an empty folder."""
    if os.path.isdir(export_dir):
        if os.listdir(export_dir):
            raise FileExistsError(
                f"`export_dir` must not exist or be an empty folder; {export_dir} is not empty "
                "(nothing was overwritten)"
            )
    elif os.path.lexists(export_dir):
        raise FileExistsError(f"`export_dir` {export_dir} exists and is not a folder")


@functools.cache
def _whitespace_class():
    """An RE2 class of the characters Python's `str.split()` splits at."""
    spaces = (chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())
    return "[" + "".join(f"\\x{{{ord(c):x}}}" for c in spaces) + "]"

