"""The synthetic gene panel: real human gene symbols, cell types and their expression programmes.

The panel mirrors a Xenium tumour-microenvironment panel: canonical markers of every cell type of the
synthetic tissue, a broad background of signalling, housekeeping-like, cell-cycle and immune genes, and the
control features (negative control probes / codewords, genomic controls, unassigned codewords) that 10x
writes as separate feature types.
"""

from __future__ import annotations

import numpy as np

# Coarse cell types of the synthetic section, in a fixed order (codes in truth.parquet follow it).
CELL_TYPES = (
    "tumour epithelium",
    "normal epithelium",
    "fibroblast",
    "T cell",
    "B cell",
    "macrophage",
    "endothelial",
)

# Fine labels of a single-cell atlas and the coarse type they belong to (used by the reference draw).
FINE_TYPES = {
    "tumour epithelium": ("Tumour epithelium (luminal-like)", "Tumour epithelium (cycling)"),
    "normal epithelium": ("Luminal epithelium", "Basal/myoepithelial cell"),
    "fibroblast": ("Cancer-associated fibroblast", "Myofibroblast"),
    "T cell": ("CD4 T cell", "CD8 T cell", "Regulatory T cell"),
    "B cell": ("Naive B cell", "Memory B cell", "Plasma cell"),
    "macrophage": ("M2-like macrophage", "Monocyte"),
    "endothelial": ("Vascular endothelial cell", "Lymphatic endothelial cell"),
}
FINE_WEIGHTS = {
    "tumour epithelium": (0.8, 0.2),
    "normal epithelium": (0.65, 0.35),
    "fibroblast": (0.75, 0.25),
    "T cell": (0.5, 0.38, 0.12),
    "B cell": (0.55, 0.3, 0.15),
    "macrophage": (0.75, 0.25),
    "endothelial": (0.85, 0.15),
}

# Markers per coarse type: strongly expressed (log2 fold ~ 3-5 over background).
MARKERS = {
    "tumour epithelium": ["EPCAM", "KRT8", "KRT18", "KRT19", "ERBB2", "MKI67", "CDH1", "CLDN4", "ESR1",
                          "GATA3", "FOXA1", "TFF1", "AGR2", "SCGB2A2", "MUC1", "CEACAM6", "TOP2A", "CCND1",
                          "KRT7", "SPDEF", "XBP1", "GRB7", "MYC"],
    "normal epithelium": ["EPCAM", "KRT8", "KRT18", "KRT19", "CDH1", "KRT5", "KRT14", "KRT17", "ACTA2",
                          "OXTR", "MYLK", "TP63", "KIT", "ELF5", "KRT15", "KRT7", "CLDN4", "ANKRD30A"],
    "fibroblast": ["COL1A1", "COL1A2", "COL3A1", "DCN", "LUM", "PDGFRA", "PDGFRB", "FAP", "POSTN",
                   "SFRP2", "FBLN1", "COL6A3", "MMP2", "THY1", "VIM", "SPARC", "CTHRC1", "COL5A1", "FN1"],
    "T cell": ["CD3E", "CD3D", "CD3G", "CD2", "TRAC", "CD8A", "CD4", "CD247", "IL7R", "CCR7", "GZMK",
               "CD5", "CD6", "LCK", "ZAP70", "CD28", "ITK", "TRBC1", "PTPRC", "CD52"],
    "B cell": ["MS4A1", "CD79A", "CD79B", "CD19", "CD22", "PAX5", "BANK1", "CD37", "FCRL5", "TCL1A",
               "BLK", "CR2", "IGHM", "IGKC", "MZB1", "JCHAIN", "PTPRC", "CD52", "CXCR5"],
    "macrophage": ["CD68", "CD163", "LYZ", "C1QA", "C1QB", "C1QC", "CD14", "FCGR3A", "MRC1", "MS4A7",
                   "AIF1", "TYROBP", "FCER1G", "CSF1R", "APOE", "ITGAM", "MARCO", "PTPRC", "MSR1", "SPP1"],
    "endothelial": ["PECAM1", "VWF", "CDH5", "CLDN5", "KDR", "FLT1", "TEK", "EMCN", "ESAM", "RAMP2",
                    "PLVAP", "AQP1", "ENG", "EGFL7", "SOX17", "MMRN1", "LYVE1", "PROX1"],
}

# Fine-type programmes (added on top of the coarse profile; log2 fold).
FINE_MARKERS = {
    "Tumour epithelium (cycling)": {"MKI67": 2.5, "TOP2A": 2.5, "CCNB1": 2.0, "BIRC5": 2.0, "CENPF": 2.0},
    "Tumour epithelium (luminal-like)": {"ESR1": 1.0, "PGR": 1.5, "TFF3": 1.5},
    "Luminal epithelium": {"KRT5": -2.5, "KRT14": -2.5, "TP63": -3.0, "ACTA2": -2.5, "ELF5": 1.0},
    "Basal/myoepithelial cell": {"KRT8": -1.5, "KRT18": -1.5, "ELF5": -2.0, "MYH11": 2.5, "CNN1": 2.5},
    "Cancer-associated fibroblast": {"FAP": 1.0, "ACTA2": -1.0},
    "Myofibroblast": {"ACTA2": 3.0, "MYH11": 1.5, "TAGLN": 2.5, "DCN": -1.0},
    "CD4 T cell": {"CD4": 2.5, "CD8A": -4.0, "CD8B": -4.0, "IL7R": 1.5, "CCR7": 1.0},
    "CD8 T cell": {"CD8A": 3.0, "CD8B": 3.0, "CD4": -4.0, "GZMK": 2.0, "GZMB": 2.0, "NKG7": 2.0, "PRF1": 1.5},
    "Regulatory T cell": {"FOXP3": 4.0, "IL2RA": 3.0, "CTLA4": 3.0, "CD4": 2.0, "CD8A": -4.0, "CD8B": -4.0},
    "Naive B cell": {"TCL1A": 1.5, "IGHD": 3.0, "IGHM": 1.5, "MZB1": -2.0, "JCHAIN": -2.0},
    "Memory B cell": {"CD27": 2.0, "IGHM": -1.0, "MZB1": -1.0, "JCHAIN": -1.0},
    "Plasma cell": {"MZB1": 4.0, "JCHAIN": 4.0, "XBP1": 3.0, "SDC1": 3.0, "MS4A1": -3.0, "CD19": -3.0,
                    "PAX5": -3.0, "IGKC": 3.0},
    "M2-like macrophage": {"CD163": 1.0, "MRC1": 1.0},
    "Monocyte": {"CD163": -2.0, "C1QA": -2.0, "C1QB": -2.0, "S100A8": 3.0, "S100A9": 3.0, "FCN1": 3.0},
    "Vascular endothelial cell": {"LYVE1": -4.0, "PROX1": -4.0, "PDPN": -2.0},
    "Lymphatic endothelial cell": {"LYVE1": 3.0, "PROX1": 3.0, "PDPN": 3.0, "CCL21": 3.0, "VWF": -2.0},
}

# Niche programmes: the same type expresses some genes differently by compartment (log2 fold), e.g.
# exhausted T cells and SPP1+ macrophages inside tumour nests, activated CAFs at the nest border.
NICHE_SHIFTS = {
    ("T cell", "tumour nest"): {"PDCD1": 2.5, "HAVCR2": 2.0, "LAG3": 2.0, "TOX": 1.5, "CXCL13": 2.0, "CCR7": -2.0},
    ("macrophage", "tumour nest"): {"SPP1": 2.5, "APOE": 1.0, "MARCO": -1.5},
    ("fibroblast", "tumour nest"): {"POSTN": 1.5, "FAP": 1.5, "COL11A1": 2.0, "CTHRC1": 1.5},
    ("T cell", "lymphoid aggregate"): {"CCR7": 1.5, "SELL": 1.5, "TCF7": 1.0},
    ("B cell", "lymphoid aggregate"): {"CR2": 1.0, "CXCR5": 1.0},
}

# Genes only the tumour expresses more than normal epithelium (a panel shows epithelium vs epithelium
# differences only modestly: tumour vs normal differ more in morphology than in expression).
TUMOUR_VS_NORMAL = {"ERBB2": 2.0, "MKI67": 1.0, "CEACAM6": 1.0, "KRT5": -2.0, "KRT14": -2.0, "TP63": -2.0,
                    "KRT17": -1.5, "ACTA2": -2.0, "MYLK": -1.0, "OXTR": -1.0, "ELF5": -1.0}

_BACKGROUND = """
ABCC11 ACACA ACTB ACTG2 ADAM9 ADAM12 ADAMTS1 ADGRE1 ADGRL4 ADH1B ADIPOQ AGR3 AHR AKT1 ALDH1A1 ALDH1A3
ANGPT1 ANGPT2 ANPEP ANXA1 ANXA2 APOC1 APOD AR AREG ARG1 ATF3 ATM AURKA AURKB AXL B2M BAX BCL2 BCL6
BCL2L1 BIRC3 BMP2 BMP4 BRCA1 BRCA2 BTK C3 C5AR1 C7 CA9 CALD1 CAV1 CAV2 CCL2 CCL3 CCL4 CCL5 CCL8
CCL13 CCL17 CCL18 CCL19 CCL20 CCL22 CCNA2 CCNE1 CCR1 CCR2 CCR4 CCR5 CCR6 CD1A CD1C CD24 CD36 CD38
CD40 CD44 CD47 CD55 CD58 CD59 CD69 CD70 CD74 CD80 CD83 CD86 CD93 CD96 CD109 CD160 CD164 CD200 CD209
CD226 CD244 CD274 CD276 CDC20 CDH2 CDH3 CDH11 CDK1 CDK4 CDK6 CDKN1A CDKN2A CDKN3 CEACAM1 CEACAM5
CENPA CENPE CFB CFD CHI3L1 CHIT1 CIITA CKS2 CLEC4C CLEC9A CLEC10A CLEC14A CLU CMKLR1 CNN1 COL4A1
COL4A2 COL5A2 COL11A1 COL12A1 COL15A1 COL17A1 CPA3 CRABP2 CREB3L1 CRISPLD2 CRYAB CSF2RA CSF3 CSF3R
CST3 CTLA4 CTNNB1 CTSB CTSD CTSG CTSK CTSL CX3CR1 CXCL1 CXCL2 CXCL5 CXCL8 CXCL9 CXCL10 CXCL11 CXCL12
CXCL13 CXCL14 CXCR3 CXCR4 CXCR6 CYP1B1 CYTIP DAPK3 DEPTOR DLL4 DMKN DNAAF1 DPT DSC2 DSG3 DSP DST
DUSP1 DUSP5 E2F1 EDN1 EDNRB EEF1A1 EGFR EGR1 EIF4EBP1 ELANE ENAH EPHA2 EPHB4 ERBB3 ERBB4 ERN1 ESR2
ETV6 EZH2 F3 FABP4 FABP5 FASN FBLN2 FBN1 FBP1 FCER1A FCGR1A FCGR2A FCGR2B FGF2 FGFR1 FGFR2 FGL2
FHL2 FKBP5 FLNA FLT3 FLT4 FN1 FOS FOSB FOXC1 FOXC2 FOXM1 FSTL1 FZD7 GAPDH GATA2 GLUL GNLY GPNMB
GPR183 GSN GZMA GZMH HAVCR2 HDC HEY1 HIF1A HLA-A HLA-B HLA-C HLA-DPA1 HLA-DPB1 HLA-DQA1 HLA-DRA
HLA-DRB1 HMGB2 HMOX1 HPGD HSPA1A HSPB1 ICAM1 ICOS IDO1 IFNG IGF1 IGF2 IGFBP2 IGFBP3 IGFBP4 IGFBP5
IGFBP7 IL1B IL2RB IL6 IL10 IL15 IL18 IL32 INHBA IRF4 IRF8 ITGA6 ITGAE ITGAX ITGB2 ITGB4 JAG1 JUN
JUNB KLF2 KLF4 KLF5 KLRB1 KLRC1 KLRD1 KLRF1 KRT6A KRT6B KRT16 KRT23 KRT81 LAG3 LAMB3 LAMP3 LDHA
LEP LGALS3 LGALS9 LIF LILRA4 LILRB4 LMNA LPL LRP1 LTB MAF MAP3K8 MCAM MDM2 MET MGP MKI67 MLPH MMP1
MMP3 MMP7 MMP9 MMP11 MMP12 MMP13 MNDA MPO MRC2 MS4A2 MUC16 MX1 MYB MYH9 MYO10 NCAM1 NDUFA4L2
NFKBIA NKG7 NOTCH1 NOTCH3 NRP1 NT5E OGN OPRPN OSR2 PADI4 PCNA PDCD1 PDCD1LG2 PDGFB PDGFRL PDK4 PECAM1
PELI1 PGR PIGR PIM1 PLA2G2A PLAU PLAUR PLIN1 PLK1 PLN POLR2J3 POU2AF1 PPARG PRDM1 PRF1 PTGDS PTGS2
PTN QPRT RAMP1 RAMP3 RBM3 RGS1 RGS5 RHOB RNF43 RORC RPL13A RPLP0 RUNX1 RUNX3 S100A2 S100A4 S100A6
SCD SCGB1D2 SDC4 SELE SELL SELP SERPINA3 SERPINE1 SERPINF1 SFRP1 SFRP4 SH2D1A SLAMF1 SLAMF7 SLC2A1
SLC25A37 SMAD3 SNAI1 SNAI2 SOCS3 SOX2 SOX4 SOX9 SOX18 SPIB SQLE SRPK1 STAT1 STAT3 STC1 SULF1 SYK
TACSTD2 TAGLN TCF4 TCF7 TENT5C TFRC TGFB1 TGFB3 TGFBI THBS1 THBS2 TIGIT TIMP1 TIMP3 TLR2 TLR4
TNC TNF TNFRSF4 TNFRSF9 TNFRSF17 TNFRSF18 TNFSF10 TNFSF13B TOX TPSAB1 TRAF4 TRIB1 TSLP TUBB2B
TWIST1 TWIST2 TYMS UBE2C UCP1 VEGFA VEGFB VEGFC VCAN WARS1 WNT5A WT1 XCL1 XCL2 ZEB1 ZEB2 ZNF562
ACKR1 ALOX5AP AMY2A BASP1 BGN C1R C1S CAPN14 CD8B CDKN1B CHGA CTSW CYBB DKK1 DUSP6 EGLN3 EPOR
EREG ETS1 EVL FGFBP1 FOLR1 GJB2 HES1 HOXB13 ID1 ID3 IL2RA IL4R ITGA2 ITGB1 KRT20 LGALS1 LIMD1
LTF MALL MEDAG MEG3 MEIS2 MSLN NPY1R NRG1 PDPN PIK3CA PTEN RB1 S100A8 S100A9 S100P SCGB2A1 SEMA3C
SLC7A11 SMO SPINK1 SRC STEAP4 SYTL2 TET2 TFF3 TP53 TRPS1 VIM-AS1 WFDC2 ZNF366 FOXP3 GZMB IGHD
CD27 SDC1 FCN1 CCL21 CCNB1 BIRC5 CENPF MYH11 TUBA1B NUSAP1 STMN1 HMGB1 NEAT1 MALAT1
"""


def gene_panel() -> list[str]:
    """The synthetic panel: marker genes first, then the background genes, each symbol once."""
    seen: dict[str, None] = {}
    for genes in MARKERS.values():
        for g in genes:
            seen.setdefault(g, None)
    for fine in FINE_MARKERS.values():
        for g in fine:
            seen.setdefault(g, None)
    for g in _BACKGROUND.split():
        if g != "VIM-AS1":
            seen.setdefault(g, None)
    return list(seen)


def control_features(n_neg_probe: int = 20, n_neg_codeword: int = 41, n_genomic: int = 0, n_unassigned: int = 80):
    """Names and 10x feature types of the control features (as Xenium 2.x writes them)."""
    names, types = [], []
    for i in range(n_neg_probe):
        names.append(f"NegControlProbe_{i:05d}")
        types.append("Negative Control Probe")
    for i in range(n_neg_codeword):
        names.append(f"NegControlCodeword_{500 + i:04d}")
        types.append("Negative Control Codeword")
    for i in range(n_genomic):
        names.append(f"Intergenic_Region_{i}")
        types.append("Genomic Control")
    for i in range(n_unassigned):
        names.append(f"UnassignedCodeword_{i:04d}")
        types.append("Unassigned Codeword")
    return names, types


def expression_profiles(genes: list[str], rng: np.random.Generator) -> np.ndarray:
    """Per coarse type relative expression (n_types, n_genes), rows summing to 1.

    A shared log-normal baseline (most panel genes are low everywhere, as in a targeted panel), plus each
    type's markers, the tumour-vs-normal differences, and a little type-specific noise.
    """
    idx = {g: i for i, g in enumerate(genes)}
    n_genes = len(genes)
    base = rng.normal(-1.0, 1.2, size=n_genes)  # log2 baseline
    prof = np.tile(base, (len(CELL_TYPES), 1))
    prof += rng.normal(0.0, 0.35, size=prof.shape)
    for t, name in enumerate(CELL_TYPES):
        for g in MARKERS[name]:
            prof[t, idx[g]] = max(prof[t, idx[g]], 0) + rng.uniform(3.0, 5.0)
    # tumour and normal epithelium share most of their programme
    t_tum, t_norm = CELL_TYPES.index("tumour epithelium"), CELL_TYPES.index("normal epithelium")
    shared = 0.5 * (prof[t_tum] + prof[t_norm])
    prof[t_tum] = 0.25 * prof[t_tum] + 0.75 * shared
    prof[t_norm] = 0.25 * prof[t_norm] + 0.75 * shared
    for g, lfc in TUMOUR_VS_NORMAL.items():
        prof[t_tum, idx[g]] = prof[t_norm, idx[g]] + lfc
    # PTPRC/CD52 shared by immune cells; VIM by mesenchymal and immune cells
    out = np.exp2(prof)
    return out / out.sum(axis=1, keepdims=True)


def fine_shift(genes: list[str], fine: str) -> np.ndarray:
    """Multiplicative change (n_genes,) that a fine label applies on its coarse profile."""
    idx = {g: i for i, g in enumerate(genes)}
    shift = np.zeros(len(genes))
    for g, lfc in FINE_MARKERS.get(fine, {}).items():
        shift[idx[g]] = lfc
    return np.exp2(shift)


def niche_shift(genes: list[str], cell_type: str, compartment: str) -> np.ndarray | None:
    """Multiplicative change (n_genes,) of a type in a compartment, or None when there is none."""
    shifts = NICHE_SHIFTS.get((cell_type, compartment))
    if not shifts:
        return None
    idx = {g: i for i, g in enumerate(genes)}
    out = np.zeros(len(genes))
    for g, lfc in shifts.items():
        out[idx[g]] = lfc
    return np.exp2(out)
