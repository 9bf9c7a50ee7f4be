"""The end-to-end demo behind ``cellsymphony demo`` and ``make demo``.

It runs the whole pipeline on the built-in synthetic tissue with tiny models and short training,
so that it finishes within minutes on a 2-core CPU. :data:`DEMO_SETTINGS` lists every setting that
differs from the paper's; the report prints it.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from ._settings import logger

# what the demo runs with, against what the paper (or the package default) uses
DEMO_SETTINGS = {
    "cells": ("4,000 synthetic cells", "150k-460k cells per Xenium Prime 5k section"),
    "morphology encoder": (
        "'tiny' ViT with random weights (untrained), and the 'handcrafted' encoder, which the classifiers and the "
        "contrastive alignment use",
        "UNI2-h (681M parameters, gated weights)",
    ),
    "expression encoder": ("tiny scGPT checkpoint with random weights (untrained)", "scGPT whole-human"),
    "classifier size": ("d_model 64, 2 layers, 4 heads, 15 epochs, lr 1e-3", "d_model 512, 6 layers, 8 heads, 20 epochs, lr 3e-5"),
    "contrastive training": ("30 epochs", "package default 20 epochs on far more cells"),
}

CLASSIFIER_KW = {"d_model": 64, "n_layers": 2, "n_heads": 4, "epochs": 15, "lr": 1e-3, "batch_size": 64}


@contextmanager
def _step(name: str, timings: dict):
    logger.info("demo: %s ...", name)
    t0 = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t0
    logger.info("demo: %s done in %.1f s", name, timings[name])


def run_demo(out: str | Path, *, n_cells: int = 4000, seed: int = 0, spatialdata: bool = False) -> Path:
    """Run the pipeline on the synthetic tissue and write its outputs to ``out``.

    Writes ``out/xenium/`` (the synthetic Xenium bundle), ``out/cellsymphony.h5mu``,
    ``out/figures/*.png`` and ``out/report.html``; returns the path of the report.
    """
    import anndata as ad
    import pandas as pd

    from . import datasets, io, pp, tl
    from ._report import write_report
    from ._run import write_viewer_files

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    with _step("synthetic Xenium bundle", timings):
        bundle = datasets.synthetic_xenium(out / "xenium", n_cells=n_cells, seed=seed, overwrite=True)
    with _step("read_xenium", timings):
        mdata = io.read_xenium(bundle)

    with _step("morphology embeddings (tiny ViT, cell mode)", timings):
        pp.embed_morphology(mdata, model="tiny", mode="cell")
    with _step("morphology embeddings (handcrafted)", timings):
        # computed last, so it is the "latest" morphology representation used downstream: the tiny ViT is untrained
        pp.embed_morphology(mdata, model="handcrafted")

    with _step("expression embeddings (tiny scGPT)", timings):
        ckpt = datasets.tiny_scgpt_checkpoint(out / "scgpt_tiny", list(mdata["rna"].var_names), seed=seed)
        pp.embed_expression(mdata, model_dir=ckpt, seed=seed)

    with _step("SingleR labels", timings):
        reference = ad.read_h5ad(bundle / "reference.h5ad")
        pp.annotate_singler(mdata, reference, ref_label_key="cell_type", seed=seed)
    with _step("H&E nucleus-classifier labels + registration QC", timings):
        # logs the registration QC (median / 95th percentile match distance, systematic offset)
        pp.transfer_nucleus_labels(mdata, bundle / "he_nuclei.csv", x_key="x", y_key="y", label_key="class")

    from ._run import trainable_exclude

    label_key = "singler"
    exclude = trainable_exclude(mdata, label_key, "singler_confident")
    with _step("classifier comparison", timings):
        tl.compare_classifiers(
            mdata,
            label_key,
            archs=("unimodal", "spatial", "dual", "multi_input", "morphology"),
            confident_key="singler_confident",
            exclude=exclude,
            seed=seed,
            key_added="cs_compare",
            **CLASSIFIER_KW,
        )
    with _step("classifier (dual) for predictions", timings):
        tl.train_classifier(mdata, label_key, arch="dual", confident_key="singler_confident", exclude=exclude, seed=seed,
                            **CLASSIFIER_KW)  # fmt: skip

    with _step("contrastive alignment", timings):
        tl.align_contrastive(mdata, epochs=30, seed=seed)
    with _step("niches and enrichment", timings):
        tl.niches(mdata, use_rep="X_cs_contrastive", seed=seed)
        tl.cluster_enrichment(mdata, "cs_niche", label_key, key_added="cs_niche_enrichment")
        tl.spatial_coherence(mdata, "cs_niche", seed=seed, n_perms=200, key_added="cs_niche_coherence")

    with _step("write .h5mu", timings):
        io.write(mdata, out / "cellsymphony.h5mu")
    with _step("Xenium Explorer / SpatialData files", timings):
        write_viewer_files(mdata, out, spatialdata=spatialdata)
    with _step("report and figures", timings):
        note = pd.DataFrame.from_dict(DEMO_SETTINGS, orient="index", columns=["this demo", "the paper"])
        report = write_report(mdata, out, settings_note=note, timings=timings)
    logger.info("demo: report at %s", report)
    return report
