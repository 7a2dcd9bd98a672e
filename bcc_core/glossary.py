"""Plain words for the class names and technical terms the app shows (tooltips, captions, reports).

One place, so a page never invents its own explanation of a term and two pages never disagree.
"""

from __future__ import annotations

CLASSES: dict[str, str] = {
    "basophil": "Basophil: granulocyte with large dark-purple granules that often hide the nucleus.",
    "erythroblast": "Erythroblast (nucleated red cell): round dense nucleus, blue-to-pink cytoplasm.",
    "monocyte": "Monocyte: large cell, folded or kidney-shaped nucleus, grey-blue cytoplasm, sometimes vacuoles.",
    "myeloblast": "Myeloblast (blast): large immature cell, fine open chromatin, nucleoli, scant blue cytoplasm. "
                  "Blasts in blood need urgent expert review.",
    "seg_neutrophil": "Segmented neutrophil: nucleus in 2-5 lobes, pale pink cytoplasm with fine granules.",
    "eosinophil": "Eosinophil: usually two nuclear lobes, cytoplasm full of orange-red granules.",
    "lymphocyte": "Lymphocyte: small round cell, dense nucleus filling most of the cell, thin rim of blue cytoplasm.",
    "Benign": "Benign: haematogones (normal B-cell precursors), not leukaemia.",
    "Early": "Early: early precursor B-cell acute lymphoblastic leukaemia (early pre-B ALL).",
    "Pre": "Pre: precursor B-cell acute lymphoblastic leukaemia (pre-B ALL).",
    "Pro": "Pro: progenitor B-cell acute lymphoblastic leukaemia (pro-B ALL).",
}

TERMS: dict[str, str] = {
    "calibrated confidence": "Temperature-scaled probability: among test images given about this confidence, "
                             "about this fraction were right. It holds only for images like the training data.",
    "ECE": "Expected calibration error: the average gap between confidence and accuracy across confidence bins "
           "(0 = perfectly calibrated).",
    "shown as OK": "The share of images given no flag at all; every other image is sent to review.",
    "wrong and OK": "Images shown as OK whose suggested class was wrong: the errors a reviewer would not be "
                    "prompted to look at.",
    "review rule": "The confidence below which a result goes to review, chosen so that errors among results "
                   "shown as OK stay below a stated rate (Clopper-Pearson upper bound, fixed-sequence testing).",
    "out of distribution": "Unlike the training images (another lab, stain, scanner or cell type), measured on "
                           "the network's internal features (Mahalanobis, nearest-neighbour and energy scores).",
    "95% interval": "Wilson score interval: the range that holds the true rate with 95% confidence given "
                    "the number of images measured.",
    "kappa": "Cohen's kappa: agreement beyond chance (1 = perfect, 0 = chance).",
    "macro-F1": "The F1 score (balance of precision and recall) averaged over classes with equal weight.",
    "precision": "Of the images suggested as this class, the share that really were this class.",
    "recall": "Of the images of this class, the share the model suggested as this class (sensitivity).",
    "exchangeable": "Images that come from the same source in the same way as the calibration images, so "
                    "that statistics measured on one carry over to the other.",
    "prediction set": "Classes the model cannot rule out at a 95% coverage level (split-conformal prediction).",
}


def describe_class(name: str) -> str:
    """Plain-language description of a class name; the name itself when none is known."""
    return CLASSES.get(name, name.replace("_", " "))


def term(name: str) -> str:
    """Plain-language explanation of a technical term (KeyError names the known terms)."""
    try:
        return TERMS[name]
    except KeyError:
        raise KeyError(f"no glossary entry {name!r}; known: {sorted(TERMS)}") from None
