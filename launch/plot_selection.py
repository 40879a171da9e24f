#!/usr/bin/env python
"""Draw a warm-up's block scores and its selection, per layer and module (the paper's Fig. 4 and 5).

    python launch/plot_selection.py --run_dir runs/smt

Reads ``block_scores.safetensors`` and ``selection.json`` from a run of ``launch/train.py`` and
writes, into ``--output_dir`` (default: the run directory):

- ``scores_by_layer.png``: each module type's mean block score per layer (q, k, v, o, and the MLP
  projections where they were targets): which matrices the warm-up's gradients favour;
- ``selection_map.png``: selected blocks per layer and module type, one heat-map cell each;
- ``selection_shares.json``: the selected blocks and their share per module type (the paper
  reports that V receives most), and the mean score per module type and layer.

Needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from smt_dist.files.atomic import write_json
from smt_dist.files.jsonfile import read_json

LAYER = re.compile(r"\.(\d+)\.")
ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/plot_selection.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", required=True, help="A launch/train.py output directory.")
    parser.add_argument("--output_dir", default=None, help="Where the PNGs go (default: --run_dir).")
    args = parser.parse_args(argv)
    try:
        summary = plot(Path(args.run_dir), Path(args.output_dir or args.run_dir))
    except (ValueError, OSError) as err:
        print(f"plot_selection.py: error: {err}", file=sys.stderr)
        return 1
    for kind, row in summary["selected"].items():
        print(f"{kind}: {row['blocks']} blocks ({row['share']:.1%})")
    return 0


def module_kind(name: str) -> tuple[int, str]:
    """``(layer, module type)`` of a target's name, e.g. ``(3, "v_proj")``."""
    found = LAYER.search(name)
    if found is None:
        raise ValueError(f"Target {name!r} has no layer number in its name.")
    return int(found.group(1)), name.rsplit(".", 1)[-1]


def tables(scores: dict, blocks: dict) -> tuple[list[int], list[str], dict, dict]:
    """Layers, module types, mean score and selected-block count per ``(layer, type)``."""
    mean, chosen = {}, {}
    for name, grid in scores.items():
        key = module_kind(name)
        mean[key] = float(grid.float().mean())
        chosen[key] = len(blocks.get(name, []))
    layers = sorted({layer for layer, _ in mean})
    kinds = sorted(
        {kind for _, kind in mean}, key=lambda k: (ORDER.index(k) if k in ORDER else len(ORDER), k)
    )
    return layers, kinds, mean, chosen


def plot(run_dir: Path, output_dir: Path) -> dict:
    from safetensors.torch import load_file

    score_file, selection_file = run_dir / "block_scores.safetensors", run_dir / "selection.json"
    for path in (score_file, selection_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; plot a run that did its own warm-up.")
    scores = load_file(score_file)
    blocks = read_json(selection_file, what="Selection file")["blocks"]
    layers, kinds, mean, chosen = tables(scores, blocks)
    total = sum(chosen.values())
    per_kind = {kind: sum(n for (_, k), n in chosen.items() if k == kind) for kind in kinds}
    summary = {
        "selected": {kind: {"blocks": n, "share": n / max(total, 1)} for kind, n in per_kind.items()},
        "mean_score": {kind: [mean.get((layer, kind)) for layer in layers] for kind in kinds},
        "layers": layers,
    }

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(6, 4))
    for kind in kinds:
        axis.plot(layers, summary["mean_score"][kind], marker="o", label=kind)
    axis.set_xlabel("layer")
    axis.set_ylabel("mean block score (warm-up gradient)")
    axis.set_title("Warm-up gradient magnitude per layer")
    axis.legend()
    figure.tight_layout()
    figure.savefig(output_dir / "scores_by_layer.png", dpi=120)
    plt.close(figure)

    grid = [[chosen.get((layer, kind), 0) for kind in kinds] for layer in layers]
    figure, axis = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.2 + 0.35 * len(layers)))
    image = axis.imshow(grid, cmap="viridis", aspect="auto")
    axis.set_xticks(range(len(kinds)), kinds)
    axis.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    axis.set_xlabel("module")
    axis.set_ylabel("layer")
    axis.set_title(f"Selected blocks ({total} in all)")
    for row, values in enumerate(grid):
        for col, value in enumerate(values):
            axis.text(
                col, row, str(value), ha="center", va="center", color="white" if value == 0 else "black"
            )
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    figure.savefig(output_dir / "selection_map.png", dpi=120)
    plt.close(figure)
    write_json(output_dir / "selection_shares.json", summary)
    return summary


if __name__ == "__main__":
    sys.exit(main())
