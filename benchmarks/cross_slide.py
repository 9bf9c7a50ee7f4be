"""Cross-slide cell typing from H&E alone: train on section A, type the cells of H&E-only slides B.

    PYTHONPATH=src python benchmarks/cross_slide.py [--cells 2000] [--shifts 0 0.5 1.0]

Section A is the synthetic Xenium section (seed 0); each slide B is another section of the same tissue
model (seed 1, another "patient") written by ``cs.datasets.synthetic_he`` with the stain shift
``cs.datasets.stain_shift(s)`` (stain vectors, strengths, glass colour). Morphology is the handcrafted
encoder (nucleus morphometrics, stain and texture statistics: CPU only). For each model the table gives
macro-F1 against the true cell types: on A's spatially held-out blocks ("same slide") and on every cell of
each slide B:

- ``raw``: the morphology classifier on the embedding of the patches as scanned;
- ``normalised``: ``cs.pp.normalize_stain`` (Macenko) on A, the same reference for each B, embeddings of the
  normalised patches;
- ``augmented``: trained on A plus 2 stain-jittered copies of each training cell
  (``train_classifier(stain_augmentation=...)``, which calls ``cs.pp.augment_stain``; scored on A's original
  held-out cells), applied to B's raw embedding;
- ``shared space``: the classifier trained on the aligner's morphology projection (``align_contrastive``
  on A's expression PCA and its normalised embedding), applied to B's normalised embedding through
  ``aligner.transform``.
"""

from __future__ import annotations

import argparse
import time

from _common import print_table
from _he_only import ALIGNER, CLASSIFIER, expression_pca, macro_f1, quiet, section_a, slide_b

import cellsymphony as cs


def run(n_cells: int = 2000, shifts=(0.0, 0.5, 1.0), seed: int = 0) -> list[dict]:
    quiet()
    t0 = time.perf_counter()
    a, _ = section_a(n_cells, seed)
    cs.pp.embed_morphology(a, model="handcrafted", num_workers=0, key_added="X_raw")
    cs.pp.normalize_stain(a)
    cs.pp.embed_morphology(a, model="handcrafted", num_workers=0, key_added="X_norm", stain="stain")

    fit = dict(CLASSIFIER, split="spatial", seed=seed)
    models = {
        "raw": cs.tl.train_classifier(a, "truth", morph_rep="X_raw", key_added="p_raw", **fit),
        "normalised": cs.tl.train_classifier(a, "truth", morph_rep="X_norm", key_added="p_norm", **fit),
        "augmented": cs.tl.train_classifier(a, "truth", morph_rep="X_raw", key_added="p_aug", **fit,
                                            stain_augmentation={"n_copies": 2, "strength": 0.2, "seed": seed}),
    }
    expression_pca(a)
    aligner = cs.tl.align_contrastive(a, gene_rep="X_pca", morph_rep="X_norm", seed=seed, **ALIGNER)
    models["shared space"] = cs.tl.train_classifier(a, "truth", morph_rep="X_cs_contrastive", key_added="p_shared", **fit)
    rows = []
    same = {name: float(m.metrics["macro_f1"]) for name, m in models.items()}
    rows.append({"slide": "A (same slide, held-out blocks)", "shift": 0.0, **same})
    for s in shifts:
        b, _ = slide_b(n_cells, seed + 1, s)
        cs.pp.embed_morphology(b, model="handcrafted", num_workers=0, key_added="X_raw")
        cs.pp.normalize_stain(b, reference=a)
        cs.pp.embed_morphology(b, model="handcrafted", num_workers=0, key_added="X_norm", stain="stain")
        aligner.transform(b, "morphology", rep="X_norm", key_added="X_cs_contrastive")
        row = {"slide": "B (other patient, H&E only)", "shift": float(s)}
        for name, m in models.items():
            rep = {"raw": "X_raw", "normalised": "X_norm", "augmented": "X_raw", "shared space": "X_cs_contrastive"}[name]
            pred = m.predict(b, morph_rep=rep, key_added=None)
            row[name] = macro_f1(b.obs["truth"].to_numpy(), pred.to_numpy())
        rows.append(row)
    print_table(rows, title=f"Cross-slide macro-F1 ({n_cells} cells per section, handcrafted morphology)")
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=2000)
    ap.add_argument("--shifts", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    run(args.cells, tuple(args.shifts), args.seed)


if __name__ == "__main__":
    main()
