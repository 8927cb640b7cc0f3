"""`RunDir`: every path of a training run's directory, in one place.

A run directory, as `keras-moe lm train` and `keras-moe translate train`
write it:

```
config.yaml                the resolved configuration (written first)
vocab.json | wordpiece.txt the vocabulary (word-level or WordPiece)
cleaning.json              translation: pairs read, kept, and dropped per reason
tensorboard/{train,validation}
checkpoints/last.keras     every evaluation;  checkpoints/best.keras: the best one
checkpoints/step-N.weights.h5   translation: the last evaluations, for averaging
checkpoints/multi_worker/  the multi-worker loop's checkpoints
backup/                    the backup (weights and a JSON of the step): a killed run resumes here
backup.corrupt-N/          a corrupt backup, set aside (kept) when the run fell back to a checkpoint
history.csv                one row per evaluation
elapsed.json               the training time noted at every evaluation
model.keras                the final model
results.json               the final scores
translations/<split>.hyp   translation: hypotheses of the final evaluation
eval/<source>.hyp, .json   translation: `translate evaluate` outputs
inspect.html               `keras-moe inspect` report
data/                      `keras-moe translate demo`: the parallel files it trained on
```

Every pipeline module names these through a `RunDir` instead of joining
file names itself; functions that take a run directory accept a `str` or
path as well and wrap it (`RunDir.wrap`). A `RunDir` is an
`os.PathLike`, so it may be handed on wherever a path is expected.
"""

import glob
import json
import math
import os
import re

from keras_moe.pipelines.data import vocabulary as vocabulary_lib
from keras_moe.pipelines.data import wordpiece

_STEP_FILE = re.compile(r"step-(\d+)\.weights\.h5$")


def checkpoint_step(path):
    """The optimizer step N of a `step-N.weights.h5` path."""
    return int(_STEP_FILE.search(os.fspath(path)).group(1))


def step_checkpoints(directory):
    """The `step-N.weights.h5` files of `directory`, oldest first."""
    paths = [p for p in glob.glob(os.path.join(directory, "step-*.weights.h5"))
             if _STEP_FILE.search(p)]
    return sorted(paths, key=checkpoint_step)


def finite_json(data):
    """`data` with every NaN or infinite float replaced by None, and where they were.

    Returns:
        `(clean, found)`: `found` maps each replaced value's dotted path
        (`"valid.perplexity"`, `"history.loss.3"`) to `"nan"`, `"inf"` or
        `"-inf"`.
    """
    found = {}

    def clean(value, path):
        if isinstance(value, float) and not math.isfinite(value):
            found[path] = str(value)
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value)]
        return value

    return clean(data, ""), found


def step_checkpoint(directory, step):
    """The path of the weights file of optimizer step `step` in `directory`."""
    return os.path.join(directory, f"step-{step:08d}.weights.h5")


class RunDir(os.PathLike):
    """The paths of one run directory (nothing is created until asked).

    Args:
        path: the directory, as a str or path-like object.

    Example:

    >>> run = RunDir("runs/ptb")
    >>> run.results_file
    'runs/ptb/results.json'
    >>> run.step_checkpoint(1200)
    'runs/ptb/checkpoints/step-00001200.weights.h5'
    """

    CONFIG = "config.yaml"
    CLEANING = "cleaning.json"
    HISTORY = "history.csv"
    ELAPSED = "elapsed.json"
    MODEL = "model.keras"
    RESULTS = "results.json"

    def __init__(self, path):
        if isinstance(path, RunDir):
            path = path.path
        self.path = os.fspath(path)

    @classmethod
    def wrap(cls, run_dir):
        """`run_dir` itself when it is a `RunDir`, else a `RunDir` of it."""
        return run_dir if isinstance(run_dir, cls) else cls(run_dir)

    def __fspath__(self):
        return self.path

    def __str__(self):
        return self.path

    def __repr__(self):
        return f"RunDir({self.path!r})"

    def __eq__(self, other):
        return isinstance(other, RunDir) and self.path == other.path

    __hash__ = None

    def join(self, *parts):
        """A path inside the run directory."""
        return os.path.join(self.path, *parts)

    def exists(self):
        return os.path.isdir(self.path)

    def check_creatable(self):
        """ValueError naming the path when the directory cannot be made (a file is in the way)."""
        path = os.path.abspath(self.path)
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{self.path}: is a file, not a run directory")
        parent = os.path.dirname(path)
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if parent and not os.path.isdir(parent):
            raise ValueError(
                f"{self.path}: cannot be a run directory: {parent} is a file, not a directory"
            )

    def makedirs(self):
        """Create the directory (and its parents); returns self."""
        os.makedirs(self.path, exist_ok=True)
        return self

    # Files of every run.
    @property
    def config_file(self):
        return self.join(self.CONFIG)

    @property
    def history_file(self):
        return self.join(self.HISTORY)

    @property
    def elapsed_file(self):
        return self.join(self.ELAPSED)

    @property
    def model_file(self):
        return self.join(self.MODEL)

    @property
    def results_file(self):
        return self.join(self.RESULTS)

    @property
    def word_vocabulary_file(self):
        return self.join(vocabulary_lib.FILENAME)

    @property
    def wordpiece_file(self):
        return self.join(wordpiece.FILENAME)

    @property
    def cleaning_file(self):
        return self.join(self.CLEANING)

    # Folders.
    @property
    def tensorboard_dir(self):
        return self.join("tensorboard")

    @property
    def tensorboard_train_dir(self):
        return self.join("tensorboard", "train")

    @property
    def tensorboard_validation_dir(self):
        return self.join("tensorboard", "validation")

    @property
    def backup_dir(self):
        return self.join("backup")

    @property
    def multi_worker_checkpoints_dir(self):
        """`checkpoints/multi_worker`: the multi-worker loop's checkpoints, shared by the workers."""
        return self.join("checkpoints", "multi_worker")

    def finished_copy(self, path, steps):
        """`model-step-N.keras` beside `model.keras` (likewise for results.json): a
        finished run's files kept when it is continued."""
        stem, ext = os.path.splitext(os.path.basename(path))
        return self.join(f"{stem}-step-{steps}{ext}")

    @property
    def checkpoints_dir(self):
        return self.join("checkpoints")

    @property
    def last_checkpoint(self):
        return self.join("checkpoints", "last.keras")

    @property
    def best_checkpoint(self):
        return self.join("checkpoints", "best.keras")

    @property
    def translations_dir(self):
        return self.join("translations")

    @property
    def eval_dir(self):
        return self.join("eval")

    @property
    def demo_data_dir(self):
        """`data/`: where `keras-moe translate demo` writes the parallel files it trains on."""
        return self.join("data")

    @property
    def inspect_report(self):
        return self.join("inspect.html")

    def step_checkpoint(self, step):
        """`checkpoints/step-N.weights.h5` of optimizer step `step`."""
        return step_checkpoint(self.checkpoints_dir, step)

    def step_checkpoints(self):
        """The run's `checkpoints/step-N.weights.h5` files, oldest first."""
        return step_checkpoints(self.checkpoints_dir)

    def eval_hypotheses(self, source):
        """`eval/<source file name>.hyp`: where `translate evaluate` writes by default."""
        return self.join("eval", os.path.basename(source) + ".hyp")

    # What the files hold.
    def is_run(self):
        """Whether the directory holds a run (its `config.yaml`)."""
        return os.path.exists(self.config_file)

    def is_finished(self):
        """Whether the run has finished (its `model.keras`)."""
        return os.path.exists(self.model_file)

    def check_is_run(self):
        """FileNotFoundError naming the directory unless it holds `config.yaml`."""
        if not self.is_run():
            raise FileNotFoundError(f"{self.path}: not a run directory (no {self.CONFIG})")

    def find_model(self):
        """The model file of a run: `model.keras` when it finished, else the last checkpoint.

        Raises:
            FileNotFoundError: naming the run directory when it holds neither.
        """
        for path in (self.model_file, self.last_checkpoint):
            if os.path.exists(path):
                return path
        raise FileNotFoundError(f"{self.path}: no model.keras or checkpoints/last.keras")

    def save_vocabulary(self, vocab):
        """Write `vocab` as `vocab.json` or `wordpiece.txt` (whichever it is); its path."""
        return vocab.save_to(self.path)

    def load_vocabulary(self):
        """The vocabulary saved in the run directory, whichever kind it is.

        `vocab.json` gives a `WordVocabulary`, `wordpiece.txt` a
        `WordPieceVocabulary`; both share `encode_line`, `encode_lines`,
        `words_in`, `decode` and `len`.

        Raises:
            FileNotFoundError: naming the directory when it holds neither file.
            ValueError: naming the directory when it holds both (which one
                the model was trained with cannot be told).
        """
        word, piece = vocabulary_lib.FILENAME, wordpiece.FILENAME
        found = [p for p in (self.word_vocabulary_file, self.wordpiece_file) if os.path.isfile(p)]
        if len(found) == 2:
            raise ValueError(f"{self.path}: holds both {word} and {piece}; keep one")
        if not found:
            raise FileNotFoundError(f"no vocabulary in {self.path} (expected {word} or {piece})")
        if found[0] == self.word_vocabulary_file:
            return vocabulary_lib.WordVocabulary.load(found[0])
        return wordpiece.WordPieceVocabulary.load(found[0])

    def write_json(self, path, data):
        """Write `data` as indented, strict JSON to `path` (a path of this run); returns `path`.

        Raises:
            ValueError: when `data` holds a NaN or infinite float (which
                strict JSON cannot hold); nothing is written then.
        """
        text = json.dumps(data, indent=2, allow_nan=False)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def read_json(self, path):
        """The JSON data of `path` (a path of this run), or None when the file does not exist.

        Raises:
            ValueError: naming the file when it is not valid JSON.
        """
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: not valid JSON ({error})") from None

    def write_results(self, results):
        """Write `results.json` (strict JSON); returns what was written.

        A NaN or infinite value (strict JSON has none) is written as null,
        and `non_finite` maps its dotted path to what it was.
        """
        clean, found = finite_json(results)
        if found:
            clean["non_finite"] = {
                **found, "note": "these values were NaN or infinite and are written as null",
            }
        self.write_json(self.results_file, clean)
        return clean
