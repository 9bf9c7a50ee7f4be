"""Results on the synthetic tissue, as they come out of ``make demo``: the tables quoted in the docs.

    python -m benchmarks.synthetic_results [--demo-dir demo_output]

Reads ``DIR/cellsymphony.h5mu`` written by ``cellsymphony demo`` (running the demo first when it is
missing) and prints:

1. the classifier comparison (macro / weighted F1 per architecture, on SingleR labels), and the
   agreement of each label source with the generator's true cell types;
2. held-out cross-modal retrieval of the contrastive alignment beside the chance level;
3. niches built on the raw morphology embedding against niches built on the contrastive morphology
   projection: number of niches, spatial coherence against its permutation null, the adjusted Rand
   index with the true cell types and compartments, and the strongest cell-type enrichment.

The demo uses untrained tiny encoders and the handcrafted morphology features (see the report's
settings table), so these figures describe the pipeline on synthetic data, not UNI2-h or scGPT.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pandas as pd

from ._common import print_table


def _load(demo_dir: Path):
    import mudata as md

    from cellsymphony._demo import run_demo

    h5mu = demo_dir / "cellsymphony.h5mu"
    if not h5mu.exists():
        run_demo(demo_dir)
    mdata = md.read_h5mu(h5mu)
    truth = pd.read_parquet(demo_dir / "xenium" / "truth.parquet")
    truth.index = truth["cell_id"].astype(str)
    return mdata, truth.reindex(mdata.obs_names)


def _niche_row(mdata, truth, key: str, name: str) -> dict:
    from sklearn.metrics import adjusted_rand_score

    import cellsymphony as cs
    from cellsymphony._validate import find_obs_column

    niches = find_obs_column(mdata, key).astype(str)  # cs.tl.niches writes on the modality (mod:key in mdata.obs)
    coh = cs.tl.spatial_coherence(mdata, key, n_perms=200)
    enr = cs.tl.cluster_enrichment(mdata, key, "singler")
    best = enr.sort_values("log2_odds_ratio", ascending=False).iloc[0]
    return {
        "niches from": name,
        "niches": int(niches.nunique()),
        "coherence": float(coh.loc["overall", "observed"]),
        "null": float(coh.loc["overall", "null_mean"]),
        "ARI cell type": adjusted_rand_score(truth["cell_type"], niches),
        "ARI compartment": adjusted_rand_score(truth["compartment"], niches),
        "strongest enrichment": f"{best['label']} in {best['cluster']} (log2 OR {best['log2_odds_ratio']:.1f})",
    }


def run(demo_dir: str | Path = "demo_output") -> dict[str, list[dict]]:
    """Compute the three tables; return them as lists of rows."""
    import cellsymphony as cs

    warnings.simplefilter("ignore", FutureWarning)
    cs.settings.progress = False
    mdata, truth = _load(Path(demo_dir))

    table = mdata.uns["cs_compare"]["table"]
    cls_rows = [
        {"architecture": str(idx).replace(" | ", " / "), "macro F1": row["macro F1"], "weighted F1": row["weighted F1"]}
        for idx, row in table.iterrows()
    ]
    label_rows = []
    for col in ("rna:singler", "he_label"):
        lab = mdata.obs[col].astype(object)
        ok = lab.notna() & (lab.astype(str) != "nan")
        t = truth["cell_type"].astype(str)
        if col == "he_label":  # the H&E classifier has coarse classes
            coarse = {"T cell": "lymphocyte", "B cell": "lymphocyte", "fibroblast": "fibroblast",
                      "tumour epithelium": "tumour"}  # fmt: skip
            t = t.map(coarse).fillna("other")
        agree = float((lab[ok].astype(str) == t[ok]).mean())
        label_rows.append({"labels": col, "cells labelled": int(ok.sum()), "agreement with truth": agree})

    retrieval = mdata.uns["X_cs_contrastive"]["retrieval"]
    ret_rows = [
        {"k": k, "rna -> morphology": r["rna_to_morphology"], "morphology -> rna": r["morphology_to_rna"],
         "chance": r["chance"]}  # fmt: skip
        for k, r in retrieval.iterrows()
    ]

    raw_key = mdata.uns["cellsymphony"]["latest"]["morphology"]
    cs.tl.niches(mdata, use_rep=raw_key, key_added="niche_raw")
    niche_rows = [
        _niche_row(mdata, truth, "niche_raw", f"raw morphology ({raw_key})"),
        _niche_row(mdata, truth, "cs_niche", "contrastive projection"),
    ]
    return {"classifiers": cls_rows, "labels": label_rows, "retrieval": ret_rows, "niches": niche_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", default="demo_output")
    args = parser.parse_args()
    tables = run(args.demo_dir)
    print_table(tables["classifiers"], "Classifier comparison on SingleR labels (test split)")
    print_table(tables["labels"], "Label sources against the generator's truth")
    print_table(tables["retrieval"], "Held-out retrieval of the contrastive alignment")
    print_table(tables["niches"], "Niches: raw morphology embedding vs contrastive projection")


if __name__ == "__main__":
    main()
