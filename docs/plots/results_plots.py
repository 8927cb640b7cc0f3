"""Draw the two results plots from the numbers measured in the lab notes.

The numbers below are copied by hand from the tables of the lab notes in
`docs/notes/` (each series says which table); nothing is read from run
directories, so the plots can be redrawn without the runs. matplotlib is
needed only here, not by keras-moe:

    pip install matplotlib
    python docs/plots/results_plots.py

It writes `docs/images/results_lm.png` and `docs/images/results_translation.png`
(paths relative to the repository root, wherever it is run from).
"""

import pathlib

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

IMAGES = pathlib.Path(__file__).resolve().parents[1] / "images"
PTB_NOTES = "docs/notes/2026-11-ptb-lab-notes.md"
M30K_NOTES = "docs/notes/2026-11-multi30k-lab-notes.md"

# Penn Treebank: per-word validation perplexity, seed 1 of each setting.
LM_STEPS = [400, 800, 1200, 1600, 2000, 2400, 2800, 3200, 3600, 4000, 4400, 4800]
LM_SERIES = [
    # (label, steps, perplexities, colour, line style)
    # PTB_NOTES, "How much the middle block is worth" (evaluated at these steps only).
    ("no middle block (cpu-2xlstm)", [400, 800, 1600, 2400, 3200, 4000, 4800],
     [259.3, 178.8, 143.7, 131.1, 125.1, 121.3, 119.5], "0.5", ":"),
    # PTB_NOTES, "The runs again, with independent dropout masks", cpu-dense column.
    ("dense block, dropout 0.25 (cpu-dense)", LM_STEPS,
     [211.5, 147.7, 127.9, 117.7, 113.0, 110.6, 109.7, 109.5, 109.2, 108.6, 109.0, 109.5],
     "tab:cyan", "--"),
    # PTB_NOTES, "Expert dropout on both models", dense, hidden dropout 0.4 column.
    ("dense block, hidden dropout 0.4", LM_STEPS,
     [215.6, 151.3, 131.9, 120.9, 115.8, 112.1, 110.3, 109.3, 107.5, 106.9, 106.3, 106.2],
     "tab:blue", "-"),
    # PTB_NOTES, "The paper's MoE-1-Wide after the fix, and a third dense seed", MoE-1-Wide column.
    ("MoE-1-Wide (cpu-moe-1-wide)", LM_STEPS,
     [241.5, 160.5, 136.8, 124.5, 117.8, 114.0, 111.6, 110.4, 109.2, 108.5, 107.8, 108.0],
     "tab:purple", "-."),
    # PTB_NOTES, "The runs again, with independent dropout masks", cpu-moe-32 column.
    ("MoE, 32 experts (cpu-moe-32)", LM_STEPS,
     [232.1, 157.8, 135.2, 122.8, 116.4, 111.9, 109.9, 108.9, 107.7, 107.0, 106.4, 107.0],
     "tab:orange", "--"),
    # PTB_NOTES, "More experts, the scaled MoE after the fix, and a second seed", 128 experts column.
    ("MoE, 128 experts", LM_STEPS,
     [234.2, 158.8, 134.7, 122.2, 115.8, 111.1, 109.3, 108.0, 106.8, 106.7, 106.1, 106.7],
     "tab:red", "-"),
]

# Multi30k En->De: validation BLEU (greedy decoding, whole validation set).
MT_STEPS = [500, 1000, 1500, 2000, 2500, 3000]
MT_SERIES = [
    # (group label, steps, BLEU, colour, line style); one legend entry per group.
    # M30K_NOTES, "How much the middle block is worth", no middle block column.
    ("no middle block", MT_STEPS, [2.16, 9.60, 13.57, 16.61, 17.96, 19.34], "0.5", ":"),
    # M30K_NOTES, "The paper's dropout, 0.4, two hours", val BLEU, dropout 0.3 (to step 3,000).
    ("MoE with the paper's sigmoid", MT_STEPS, [5.63, 11.14, 14.51, 17.31, 19.41, 20.37],
     "tab:green", "-."),
    # M30K_NOTES, "A second seed, and the dense baseline again", linear MoE seed 1 and seed 2.
    ("MoE without the sigmoid, unscaled (2 seeds)", MT_STEPS,
     [5.45, 18.91, 26.96, 28.75, 31.15, 31.35], "tab:olive", "--"),
    ("MoE without the sigmoid, unscaled (2 seeds)", MT_STEPS,
     [4.17, 11.72, 15.52, 20.26, 24.09, 26.87], "tab:olive", "--"),
    # M30K_NOTES, "The MoE's slow start, and moe_output_scale", scaled MoE seed 1 / seed 2.
    ("MoE without the sigmoid, output x4 (3 seeds)", MT_STEPS,
     [10.94, 23.06, 26.34, 29.07, 30.77, 31.43], "tab:orange", "-"),
    ("MoE without the sigmoid, output x4 (3 seeds)", MT_STEPS,
     [10.31, 22.98, 27.81, 29.79, 31.03, 31.35], "tab:orange", "-"),
    # M30K_NOTES, "A third seed of the scaled MoE, a second of the dense model", MoE seed 3.
    ("MoE without the sigmoid, output x4 (3 seeds)", MT_STEPS,
     [10.41, 23.91, 28.99, 29.72, 30.98, 31.40], "tab:orange", "-"),
    # M30K_NOTES, "A second seed, and the dense baseline again", dense again (seed 1).
    ("dense block (3 runs)", MT_STEPS, [11.11, 23.27, 27.61, 30.15, 32.05, 32.26], "tab:blue", "-"),
    # M30K_NOTES, "A third seed of the scaled MoE, a second of the dense model", dense seed 2.
    ("dense block (3 runs)", MT_STEPS, [10.83, 23.53, 28.56, 30.75, 31.26, 32.58], "tab:blue", "-"),
    # M30K_NOTES, "The same two hours for the dense baseline", val BLEU, dense (its end is step 2,985).
    ("dense block (3 runs)", [500, 1000, 1500, 2000, 2500, 2985],
     [10.70, 23.81, 28.11, 29.79, 30.69, 32.74], "tab:blue", "-"),
]


def _plot_lm(path):
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(11, 4.4))
    for label, steps, ppl, colour, style in LM_SERIES:
        for ax in (full, zoom):
            ax.plot(steps, ppl, style, color=colour, marker="o", markersize=3, label=label)
    full.set_title("whole run")
    zoom.set_title("steps 2,400 to 4,800")
    zoom.set_xlim(2300, 4900)
    zoom.set_ylim(104, 126)
    for ax in (full, zoom):
        ax.set_xlabel("training step (64 x 35 words each)")
        ax.set_ylabel("validation perplexity (per word)")
        ax.grid(alpha=0.3)
    full.legend(fontsize=8, loc="upper right")
    fig.suptitle("Penn Treebank: validation perplexity by step, seed 1 of each model (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_translation(path):
    fig, ax = plt.subplots(figsize=(8, 4.8))
    seen = set()
    for label, steps, bleu, colour, style in MT_SERIES:
        ax.plot(steps, bleu, style, color=colour, marker="o", markersize=3,
                label=None if label in seen else label)
        seen.add(label)
    ax.set_xlabel("training step (batches of about 4,096 tokens per side)")
    ax.set_ylabel("validation BLEU (greedy decoding)")
    ax.set_title("Multi30k En->De: validation BLEU by step (higher is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main():
    IMAGES.mkdir(parents=True, exist_ok=True)
    _plot_lm(IMAGES / "results_lm.png")
    _plot_translation(IMAGES / "results_translation.png")
    for name in ("results_lm.png", "results_translation.png"):
        print(IMAGES / name, (IMAGES / name).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
