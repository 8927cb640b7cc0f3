"""Tests of `keras-moe inspect` on a tiny trained run: tables, HTML, PNGs, a real browser.

The reference routing is the model's own `return_routing=True` output on one
line at a time (no inspector involved); the images are decoded with
TensorFlow and their pixels compared with the counts and gates they draw.
The HTML report is opened in headless Chromium, which must load it without
errors and decode every image.
"""

import base64
import html.parser
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from keras_moe.models.lm import LanguageModel
from keras_moe.monitoring import BAR_COLOR
from keras_moe.pipelines.data.vocabulary import WordVocabulary
from keras_moe.pipelines.inspection import routes as ki
from keras_moe.pipelines.inspection.report import (
    HEAT_COLOR,
    build_report,
    format_tables,
    heatmap_cell,
    inspect_run,
    render_html,
)
from keras_moe.pipelines.lm import train as lm_train
from tests.pipelines.lm.train_test import WORDS, tiny_config, write_corpus

SENTENCES = ["the cat sat on the mat", "dogs ran to a zebra"]  # "zebra" is not in the vocabulary


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    corpus = {
        "train": write_corpus(root / "train.txt", 200, 0),
        "valid": write_corpus(root / "valid.txt", 30, 1),
    }
    run_dir = root / "run"
    lm_train.train(tiny_config(corpus), str(run_dir))
    return {"run_dir": str(run_dir), "data": corpus["valid"], "root": root}


def _reference(run_dir, texts):
    """Per text, the model's own Routing of the MoE block, on one text at a time."""
    _, vocab, model, _ = lm_train.load_run(run_dir)
    routings = []
    for text in texts:
        tokens = tf.constant([vocab.encode_line(text)])
        _, by_block = model(tokens, training=False, return_routing=True)
        routings.append(by_block["moe"])
    return vocab, routings


class _Page(html.parser.HTMLParser):
    """The <img> attributes, table count and headings of an HTML page."""

    def __init__(self):
        super().__init__()
        self.images, self.tables, self.headings, self.body = [], 0, [], {}
        self._heading = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        elif tag == "table":
            self.tables += 1
        elif tag == "body":
            self.body = attrs
        elif tag in ("h2", "h3"):
            self._heading = ""

    def handle_data(self, data):
        if self._heading is not None:
            self._heading += data

    def handle_endtag(self, tag):
        if tag in ("h2", "h3") and self._heading is not None:
            self.headings.append(self._heading)
            self._heading = None


def _parse(text):
    page = _Page()
    page.feed(text)
    return page


def _png(uri):
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    data = base64.b64decode(uri[len(prefix):])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return tf.io.decode_png(data, channels=3).numpy()


def test_inspect_run_matches_the_models_own_routing(run, tmp_path, capsys):
    out = tmp_path / "report.html"
    report = inspect_run(run["run_dir"], run["data"], sentences=SENTENCES, out=out)
    printed = capsys.readouterr().out
    lines = [line for line in open(run["data"]).read().split("\n") if line.strip()]
    vocab, routings = _reference(run["run_dir"], lines)
    counts = sum(r.counts.numpy() for r in routings).astype(int)
    layer = report["layers"]["moe"]
    assert report["lines"] == len(lines) == 30 and report["report"] == str(out)
    assert [e["count"] for e in layer["experts"]] == counts.tolist()
    tokens = sum(len(vocab.encode_line(line)) for line in lines)
    assert layer["tokens_routed"] == tokens and layer["pairs"] == 2 * tokens == counts.sum()
    # Characteristic tokens from the reference routing's (token, expert) pairs.
    pairs = {}
    for line, r in zip(lines, routings, strict=True):
        for token_id, experts in zip(vocab.encode_line(line), r.expert_indices[0].numpy(),
                                     strict=True):
            row = pairs.setdefault(vocab.words[token_id], [0] * 4)
            for e in experts:
                row[e] += 1
    assert layer["characteristic"] == ki.characteristic_tokens(pairs, top=10, min_count=2)

    # The printed tables: one row per expert with its count and share.
    assert "== moe: MoE, noisy_top_k gating, 4 experts, k=2 ==" in printed
    rows = re.findall(r"^\s+(\d)\s+(\d+)\s+([\d.]+)%\s+[\d.]+ ", printed, re.M)
    assert [(int(e), int(c)) for e, c, _ in rows] == list(enumerate(counts.tolist()))
    assert [float(s) for _, _, s in rows] == pytest.approx(100 * counts / counts.sum(), abs=0.06)

    # The sentences, token by token, against the model's routing of each.
    _, sentence_routings = _reference(run["run_dir"], SENTENCES)
    for text, tokens, r in zip(SENTENCES, layer["sentences"], sentence_routings, strict=True):
        words = [w if w in vocab.words else "<unk>" for w in text.split()] + ["<eos>"]
        assert [t["token"] for t in tokens] == words
        assert [t["experts"] for t in tokens] == r.expert_indices[0].numpy().tolist()
        np.testing.assert_allclose([t["gates"] for t in tokens], r.gates[0], rtol=1e-5)
        np.testing.assert_allclose([t["clean_logits"] for t in tokens], r.clean_logits[0],
                                   rtol=1e-4, atol=1e-7)
        assert f"sentence: {text}" in printed
        table = printed.split(f"sentence: {text}")[1].split("\n")[2 : 2 + len(words)]
        for token, line in zip(tokens, table, strict=True):
            assert line.split()[:2] == [str(token["position"]), token["token"]]
            assert f"{token['experts'][0]} ({token['gates'][0]:.3f})" in line
    assert f"HTML report: {out}" in printed


def test_html_report_images_draw_the_counts_and_gates(run, tmp_path):
    report = inspect_run(run["run_dir"], run["data"], sentences=SENTENCES,
                         out=tmp_path / "r.html", quiet=True)
    page = _parse((tmp_path / "r.html").read_text(encoding="utf-8"))
    layer = report["layers"]["moe"]
    assert page.tables == 1 + len(SENTENCES)
    assert any(h.startswith("moe: MoE") for h in page.headings)
    assert [h for h in page.headings if h.startswith("Sentence")] == [
        f"Sentence {i + 1}: {s}" for i, s in enumerate(SENTENCES)]
    assert len(page.images) == 1 + len(SENTENCES)
    for img in page.images:
        assert (int(img["height"]), int(img["width"])) == _png(img["src"]).shape[:2]

    # Load bar chart: 4 bars of 512 // 4 pixels, heights round(count / max * 96).
    chart = _png(page.images[0]["src"])
    counts = np.array([e["count"] for e in layer["experts"]], np.float64)
    assert chart.shape == (96, 512, 3)
    blue = np.all(chart == BAR_COLOR, axis=-1)
    for e, count in enumerate(counts):
        column = blue[:, e * 128 + 64]
        measured = 96 - int(np.argmax(column)) if column.any() else 0
        # The one-pixel mean line may cover a bar's top row.
        assert abs(measured - round(count / counts.max() * 96)) <= 1, (e, measured, count)
    assert int(np.argmax(blue.sum(axis=0)[64::128])) == int(np.argmax(counts))

    # Gate heatmaps: one cell per (token, expert), white 0 to HEAT_COLOR 1.
    cell = heatmap_cell(4)
    for i, img in enumerate(page.images[1:]):
        heat = _png(img["src"]).astype(np.float64)
        tokens = layer["sentences"][i]
        assert heat.shape == (len(tokens) * cell, 4 * cell, 3)
        gates = np.zeros((len(tokens), 4))
        for t, token in enumerate(tokens):
            gates[t, token["experts"]] = token["gates"]
        centres = heat[cell // 2 :: cell, cell // 2 :: cell]
        expected = 255 + gates[..., None] * (np.array(HEAT_COLOR) - 255.0)
        np.testing.assert_allclose(centres, expected, atol=1)


def test_hierarchical_model_report_shows_both_levels():
    vocab = WordVocabulary(["<pad>", "<unk>", "<eos>", *sorted(set(WORDS))])
    model = LanguageModel(len(vocab), model_dim=8, blocks=("moe",), num_experts=6, num_groups=3,
                          expert_hidden_dim=4, k=1, seed=0)
    moe = model.get_layer("moe")
    rng = np.random.default_rng(0)
    for w in (moe.gating.primary.w_gate, moe.gating.primary.w_noise, moe.gating.w_gate,
              moe.gating.w_noise):
        w.assign(rng.normal(size=w.shape).astype("float32"))
    lines = ["the cat sat on a mat", "dogs ran to the big red barn", "the cat slept"]
    report = {"model": "m.keras", "data": "d.txt",
              **build_report(model, vocab, lines, ["the big cat"])}
    layer = report["layers"]["moe"]
    tokens = layer["sentences"][0]
    assert [t["token"] for t in tokens] == ["the", "big", "cat", "<eos>"]
    tables = format_tables(report)
    assert "== moe: HierarchicalMoE, noisy_top_k gating, 3 groups x 2 experts, k=1x1 ==" in tables
    assert "clean logits of groups" in tables
    for token in tokens:
        (expert,), (group,) = token["experts"], token["groups"]
        assert group == expert // 2 and [s["group"] for s in token["secondary"]] == [group]
        assert f"{expert}/g{group} (1.000)" in tables
        logits = token["clean_logits"]
        assert f"g0:{logits[0]:+.3g} g1:{logits[1]:+.3g} g2:{logits[2]:+.3g}" in tables
    page_text = render_html(report)
    assert "within the chosen groups" in page_text and "clean logits per group" in page_text
    page = _parse(page_text)
    assert [e["group"] for e in layer["experts"]] == [0, 0, 1, 1, 2, 2]
    heat = _png(page.images[1]["src"])
    assert heat.shape == (4 * heatmap_cell(6), 6 * heatmap_cell(6), 3)


def _run_cli(*args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "keras_moe.pipelines.cli", "inspect", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_prints_tables_and_writes_the_report(run, tmp_path):
    out = tmp_path / "cli.html"
    done = _run_cli("--run-dir", run["run_dir"], "--data", run["data"], "--sentence",
                    SENTENCES[0], "--out", str(out), "--max-lines", "5", "--layer", "moe")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(5 lines)" in done.stdout and "== moe: MoE" in done.stdout
    assert f"sentence: {SENTENCES[0]}" in done.stdout and f"HTML report: {out}" in done.stdout
    page = _parse(out.read_text(encoding="utf-8"))
    assert len(page.images) == 2 and page.tables == 2

    done = _run_cli("--run-dir", run["run_dir"], "--data", run["data"], "--layer", "nope")
    assert done.returncode == 2
    assert "keras-moe inspect: error:" in done.stderr and "layer='nope'" in done.stderr


def test_errors_name_the_file_or_argument(run, tmp_path):
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        inspect_run(run["run_dir"], missing, quiet=True)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        inspect_run(tmp_path, run["data"], quiet=True)
    with pytest.raises(ValueError, match="max_lines"):
        inspect_run(run["run_dir"], run["data"], max_lines=0, quiet=True)
    with pytest.raises(ValueError, match=r"sentences\[1\]"):
        inspect_run(run["run_dir"], run["data"], sentences=["a b", " "], quiet=True)


# --- a real browser --------------------------------------------------------------


@pytest.fixture
def browser():
    """Path of Chromium; requested before `run`, so a skip costs no training."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI=true but chromium is not installed (.ci/run installs it)")
    pytest.skip("chromium is not installed (apt-get install chromium): the HTML report "
                "is not opened in a browser on this machine")


def _dump_dom(browser, page, profile):
    """The DOM of `page` after load, from headless Chromium (killed if it hangs)."""
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri(),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        dom, errors = process.communicate(timeout=120)
    finally:
        try:  # the browser and its helper processes: the session this test started
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    assert process.returncode == 0, errors[-3000:]
    return dom


def test_report_loads_in_a_headless_browser(browser, run, tmp_path):
    page = tmp_path / "report.html"
    inspect_run(run["run_dir"], run["data"], sentences=SENTENCES, out=page, quiet=True)
    dom = _parse(_dump_dom(browser, page, tmp_path / "profile"))
    # The report's own script ran on load: every image decoded, no error.
    assert dom.body.get("data-images-total") == str(1 + len(SENTENCES))
    assert dom.body.get("data-images-ok") == str(1 + len(SENTENCES))
    assert dom.body.get("data-errors") == "0"
    assert dom.tables == 1 + len(SENTENCES) and len(dom.images) == 1 + len(SENTENCES)
    assert any(h.startswith("moe: MoE") for h in dom.headings)

    # The same check sees a broken image: corrupt one PNG's bytes.
    text = page.read_text(encoding="utf-8")
    start = text.index("data:image/png;base64,") + len("data:image/png;base64,")
    broken = tmp_path / "broken.html"
    broken.write_text(text[:start] + "AAAA" + text[start + 4 :], encoding="utf-8")
    dom = _parse(_dump_dom(browser, broken, tmp_path / "profile2"))
    assert dom.body.get("data-images-ok") == str(len(SENTENCES))
    assert dom.body.get("data-errors") == "1"
