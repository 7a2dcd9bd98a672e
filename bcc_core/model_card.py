"""The model card: the contract a saved model carries (classes, input, preprocessing, trust settings).

Validated against `model_card.schema.json` on save and on load, so a model whose card is missing or
inconsistent is refused with a clear message instead of producing quietly wrong answers.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

SCHEMA_VERSION = "1.0"

INTENDED_USE = (
    "Decision support for a second reader: suggests a cell class for a single stained peripheral-blood "
    "or bone-marrow cell image, with a calibrated confidence, an explanation heatmap and flags saying "
    "when the suggestion should not be trusted. A qualified person makes every decision."
)
INTENDED_USE_FIELD = (
    "Decision support for a second reader: suggests the acute lymphoblastic leukaemia category (benign "
    "haematogones, early pre-B, pre-B, pro-B ALL) of a peripheral-blood smear field image, with a calibrated "
    "confidence, an explanation heatmap and flags saying when the suggestion should not be trusted. A qualified "
    "person makes every decision; the diagnosis of ALL needs flow cytometry and the full clinical picture."
)
NOT_FOR_FIELD = [
    "Diagnosis or staging of leukaemia, or any decision without review by a qualified haematologist.",
    "Single-cell crops or bone-marrow images: the model was trained on whole peripheral-smear fields of one hospital.",
    "Images from labs, stains or scanners unlike the training data without local validation.",
]
NOT_FOR = [
    "Diagnosis, or any decision without review by a qualified haematologist / morphologist.",
    "Cell types outside the model's classes (they are flagged at best, and may be misnamed).",
    "Whole smear fields or images with several cells: the model expects one cell per image.",
    "Images from labs, stains or scanners unlike the training data without local validation.",
]


@dataclass
class ModelCard:
    """Everything needed to run, judge and reproduce a model. See model_card.schema.json."""

    model_id: str
    task: str
    classes: list[str]
    backbone: str
    weights: str
    preprocessing: dict
    gradcam_layer: str
    input: dict = field(default_factory=lambda: {"size": 224, "channels": 3, "dtype": "float32",
                                                 "range": [0, 255], "colour": "RGB"})
    training: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    split: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=lambda: {"temperature": 1.0})
    ood: dict = field(default_factory=dict)
    review_rule: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    shortcut_audit: dict = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    intended_use: str = INTENDED_USE
    not_for: list[str] = field(default_factory=lambda: list(NOT_FOR))
    limitations: list[str] = field(default_factory=list)
    created: str = ""
    schema_version: str = SCHEMA_VERSION
    reproduce: str = ""
    lineage: dict = field(default_factory=dict)  # adapted models: parent, lab, cells, before/after
    version: str = ""  # date-based (YYYY.MM.DD.HHMM, UTC), set when the model is trained or adapted
    trust: dict = field(default_factory=dict)  # bcc_core.trust.TrustModel.to_card(); empty on old cards
    model_sha256: str = ""  # SHA-256 of model.keras, written by models.save_model and checked on load

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelCard":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def temperature(self) -> float:
        return float((self.trust or {}).get("temperature") or self.calibration.get("temperature", 1.0))

    @property
    def identity(self) -> dict:
        """What a result, export or audit entry carries to name the model: id, version, weights SHA-256."""
        return {"id": self.model_id, "version": self.version or f"unversioned ({self.created or 'no date'})",
                "sha256": self.model_sha256}


def model_identity(card_or_dir) -> dict:
    """{"id", "version", "sha256"} of a model (a ModelCard, a card dict or a model folder).

    Cards written before versions were kept give "unversioned (<created>)"; the SHA-256 is the one the card
    records (`load_model` refuses a model.keras that does not match it).
    """
    if isinstance(card_or_dir, ModelCard):
        return card_or_dir.identity
    if isinstance(card_or_dir, dict):
        return ModelCard.from_dict(card_or_dir).identity
    return load_card(card_or_dir).identity


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads((Path(__file__).with_name("model_card.schema.json")).read_text())


def validate_card(d: dict) -> None:
    """Raise ValueError naming every problem when `d` is not a valid, self-consistent card."""
    import jsonschema

    v = jsonschema.Draft202012Validator(schema())
    errors = sorted(v.iter_errors(d), key=lambda e: list(e.path))
    problems = [f"{'/'.join(map(str, e.path)) or '(card)'}: {e.message}" for e in errors]
    if not problems:
        if len(set(d["classes"])) != len(d["classes"]):
            problems.append("classes: duplicate class names")
        if d["preprocessing"]["size"] != d["input"]["size"]:
            problems.append("preprocessing.size differs from input.size")
        n = len(d["classes"])
        cw = d.get("ood", {}).get("class_thresholds")
        if cw is not None and len(cw) != n:
            problems.append("ood.class_thresholds must have one value per class")
    if problems:
        raise ValueError("invalid model card:\n  " + "\n  ".join(problems))


def load_card(model_dir: str | Path) -> ModelCard:
    """Read and validate `model_card.json` from a model directory."""
    p = Path(model_dir) / "model_card.json"
    if not p.is_file():
        raise FileNotFoundError(f"{model_dir}: model_card.json is missing; refusing to load a model without its card")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    validate_card(d)
    return ModelCard.from_dict(d)


def use_statement(preprocess_mode: str) -> tuple[str, list[str]]:
    """Intended use and what-not-for texts for a single-cell model ("cell") or a smear-field model."""
    if preprocess_mode == "cell":
        return INTENDED_USE, list(NOT_FOR)
    return INTENDED_USE_FIELD, list(NOT_FOR_FIELD)


def library_versions() -> dict:
    """Versions of the libraries that shape a model's behaviour."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("tensorflow-cpu", "tensorflow", "keras", "numpy", "opencv-python-headless", "scikit-learn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
