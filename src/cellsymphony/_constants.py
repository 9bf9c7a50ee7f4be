"""Every key name the package reads or writes, in one place.

Functions import names from here instead of spelling strings, so a key can be
found (and renamed) in one place. See the data-layout page of the docs for which
function writes which key.
"""

from __future__ import annotations

# modalities
MOD_RNA = "rna"
MOD_MORPH = "morphology"
MOD_PROTEIN = "protein"

# coordinates, micrometres, on every modality
SPATIAL_KEY = "spatial"
NUCLEUS_KEY = "nucleus_centroid"

# raw counts, also kept in this layer of the rna modality (cs.io.read_xenium)
COUNTS_LAYER = "counts"

# sections
SAMPLE_KEY = "sample"
IN_IMAGE_KEY = "in_image"

# the package's own block in mdata.uns
UNS_KEY = "cellsymphony"
SAMPLES_KEY = "samples"
LATEST_KEY = "latest"

# fields of one sample's registry, mdata.uns["cellsymphony"]["samples"][sample]
REG_HE_PATH = "he_path"  # str, "" when no H&E is attached
REG_ALIGNMENT = "alignment"  # (3, 3) float64: H&E pixel (x, y, 1) -> Xenium morphology pixel
REG_PIXEL_SIZE = "pixel_size"  # micrometres per Xenium morphology pixel
REG_HE_MPP = "he_mpp"  # micrometres per H&E pixel at pyramid level 0
REG_XENIUM_PATH = "xenium_path"  # str, "" for H&E-only slides
REG_NONRIGID = "nonrigid"  # optional dict: grid_um (rows, cols, 2), origin_px (2,), step_px (cs.io.register_he)

# automatic H&E registration (cs.io.register_he, Registration.apply)
REGISTRATION_KEY = "he_registration"  # mdata.uns[...]["samples"][sample]: QC and residuals
REGISTRATION_ERROR_KEY = "registration_error_um"  # obs of both modalities: local registration error

# default result keys
X_UNI2 = "X_uni2"
X_SCGPT = "X_scgpt"
PRED_KEY = "cs_pred"
CONTRASTIVE_KEY = "X_cs_contrastive"
NICHE_KEY = "cs_niche"
SINGLER_KEY = "singler"

# H&E-only slides (cs.io.read_he_cells): class of each detected nucleus from the detection tool
NUCLEUS_CLASS_KEY = "nucleus_class"

# cell labels (cs.pp.transfer_nucleus_labels, cs.pp.import_labels, cs.pp.harmonize_labels)
HE_LABEL_KEY = "he_label"
IMPORTED_LABEL_KEY = "imported_label"
HARMONIZED_LABEL_KEY = "label_coarse"
AMBIGUOUS_LABEL = "ambiguous"

# plausibility and minimum sizes (the bad-input checks; see the docs pages named beside each)
MPP_RANGE = (0.05, 10.0)  # micrometres per pixel accepted for patches and slides (morphology page)
MIN_TRAIN_CELLS_PER_CLASS = 5  # training cells each class needs in a classifier fit (classifiers page)
MIN_TEST_CELLS_PER_CLASS = 2  # test cells each class needs for per-class test metrics (classifiers page)
MIN_TEST_CELLS = 10  # test cells a classifier fit needs for its test metrics (classifiers page)
MIN_LABELLED_CELLS_PER_CLASS = 10  # labels with fewer usable cells are left out by the pipelines (cli page)
MIN_SINGLER_REF_CELLS = 5  # reference cells per label below which SingleR warns (labels page)
MIN_CONTRASTIVE_CELLS = 10  # paired cells align_contrastive needs (contrastive page)
