"""Build the flat classifier graph (backbone + Study 1 head), save and load it with its card."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from .backbones import get_spec, resolve_weights
from .model_card import ModelCard, load_card, validate_card

FEATURES_LAYER = "features"   # GlobalAveragePooling output: penultimate features for OOD
LOGITS_LAYER = "logits"        # pre-softmax scores: temperature scaling and energy OOD
PROBS_LAYER = "probs"
FIXED_LAYERS = ("caffe_preprocess",)  # input normalisation held in weights: never trained
HASH_KEY = "model_sha256"  # card key: SHA-256 of model.keras, written by save_model, checked by load_model

_log = logging.getLogger(__name__)


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks (model files are tens of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def _normalise(x, normalisation: str):
    from keras import layers

    # Study 1 scales pixels to [0, 1]; the backbone's own expectation is derived from that here,
    # inside the model, so no page or script ever normalises by hand.
    x = layers.Rescaling(1.0 / 255.0, name="scale_0_1")(x)
    if normalisation == "minus1_1":
        return layers.Rescaling(2.0, offset=-1.0, name="scale_minus1_1")(x)
    if normalisation == "raw255":
        return layers.Rescaling(255.0, name="scale_0_255")(x)
    if normalisation == "caffe":
        import numpy as np

        # ResNet's "caffe" input: BGR on 0..255 minus the ImageNet channel means. A frozen 1x1
        # convolution does it with built-in layers only, so the saved model loads anywhere (a Lambda
        # around a Python function cannot be deserialised, not even by save_model's own copy).
        conv = layers.Conv2D(3, 1, name="caffe_preprocess", trainable=False)
        out = conv(x)
        conv.set_weights([255.0 * np.eye(3, dtype="float32")[::-1].reshape(1, 1, 3, 3),
                          -np.array([103.939, 116.779, 123.68], "float32")])
        return out
    return x


def build_head(x, n_classes: int, dropout1: float = 0.3, dense: int = 128, dropout2: float = 0.2):
    """Study 1's head: Dropout(0.3) → Dense(128, ReLU) → Dropout(0.2) → Dense(n) → softmax."""
    from keras import layers

    x = layers.Dropout(dropout1, name="head_dropout1")(x)
    x = layers.Dense(dense, activation="relu", name="head_dense")(x)
    x = layers.Dropout(dropout2, name="head_dropout2")(x)
    logits = layers.Dense(n_classes, name=LOGITS_LAYER)(x)
    return layers.Activation("softmax", name=PROBS_LAYER, dtype="float32")(logits)


def build_classifier(backbone: str, n_classes: int, weights: str | None = None, input_size: int | None = None,
                     trainable_backbone: bool = False):
    """Build the full classifier as one flat graph.

    Args:
        backbone: registry name (mobilenetv2, efficientnetb0, resnet50, small_cnn).
        n_classes: number of output classes.
        weights: 'imagenet' | path to weights file | None.
        input_size: input side (default: the backbone's).
        trainable_backbone: freeze (Study 1) or train the backbone.

    Returns:
        keras.Model: input (N, S, S, 3) float32 RGB in [0, 255]; output (N, n_classes) softmax.
        Layers `features` (GAP) and `logits` are reachable by name.
    """
    import keras
    from keras import layers

    spec = get_spec(backbone)
    w = resolve_weights(weights)
    size = input_size or spec.input_size
    inputs = keras.Input((size, size, 3), name="image")
    x = _normalise(inputs, spec.normalisation)
    # Keras only accepts 'imagenet' or None at construction time; a file is loaded afterwards.
    base = spec.build(x, "imagenet" if w == "imagenet" else None)
    if w not in (None, "imagenet"):
        base.load_weights(w)
    # Keras 3 does not propagate `trainable` from a sub-model that shares the flat graph: set each layer.
    for layer in base.layers:
        layer.trainable = trainable_backbone
    feats = layers.GlobalAveragePooling2D(name=FEATURES_LAYER)(base.output)
    out = build_head(feats, n_classes)
    return keras.Model(inputs, out, name=f"{backbone}_classifier")


def feature_extractor(model):
    """Sub-model from the classifier's input to its GAP features (N, D)."""
    import keras

    return keras.Model(model.input, model.get_layer(FEATURES_LAYER).output)


def head_only(model, until: str = PROBS_LAYER):
    """A model taking the head's input (N, D) through the head layers up to `until` (shares weights with
    `model`). D is the pooled features' size, plus the chroma histogram's when the head also reads it
    (`bcc_core.colour`: an adapted model's head input is [features, standardised histogram])."""
    import keras

    d = model.get_layer("head_dropout1").input.shape[-1]
    inp = keras.Input((d,), name="features_in")
    x = inp
    for name in ("head_dropout1", "head_dense", "head_dropout2", LOGITS_LAYER, PROBS_LAYER):
        x = model.get_layer(name)(x)
        if name == until:
            break
    return keras.Model(inp, x)


def with_list_inputs(model):
    """The same model (shared layers and weights) declared with a one-element list of inputs.

    tf-keras-vis passes a model's inputs as a list (Score-CAM to `predict`); a model declared with a bare
    input then makes Keras warn "The structure of `inputs` doesn't match the expected structure" on
    every call. Declaring the list removes the mismatch at its source; outputs are unchanged.
    """
    import keras

    return keras.Model([model.input], model.output, name=f"{model.name}_list_inputs")


def early_pooled(model, early_layer: str):
    """The early-layer OOD detector's input: `early_layer`'s output, globally average-pooled."""
    import keras

    return keras.layers.GlobalAveragePooling2D(name="early_pool")(model.get_layer(early_layer).output)


def trust_outputs_model(model, early_layer: str | None = None):
    """One forward pass → (features, logits[, early]): everything prediction, calibration and OOD need.

    With `early_layer`, a third output is that layer's globally pooled activations (the early-layer
    OOD detector's input), computed in the same pass.
    """
    import keras

    outs = [model.get_layer(FEATURES_LAYER).output, model.get_layer(LOGITS_LAYER).output]
    if early_layer:
        outs.append(early_pooled(model, early_layer))
    return keras.Model(model.input, outs)


def count_params(model) -> dict:
    """Total / trainable / non-trainable parameter counts."""
    import numpy as np

    tr = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    nt = int(sum(np.prod(w.shape) for w in model.non_trainable_weights))
    return {"total": tr + nt, "trainable": tr, "non_trainable": nt}


def save_model(model, card: ModelCard, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write `model.keras`, `model_card.json` (validated, with the SHA-256 of model.keras under
    `model_sha256`, which `load_model` checks) and any extra JSON files to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    validate_card(card.to_dict())
    # Inference needs the weights only: an uncompiled copy keeps a fine-tuned model's Adam moments
    # (2x the unfrozen weights) out of the bundled file. (keras.models.clone_model would recompile it.)
    clean = type(model).from_config(model.get_config())
    clean.set_weights(model.get_weights())
    clean.save(out / "model.keras")
    card_dict = {**card.to_dict(), HASH_KEY: file_sha256(out / "model.keras")}
    (out / "model_card.json").write_text(json.dumps(card_dict, indent=2))
    for name, obj in (extra or {}).items():
        (out / name).write_text(json.dumps(obj, indent=2))
    return out


def check_model_hash(model_dir: str | Path) -> str | None:
    """Compare model.keras with the hash its card records.

    Returns:
        The file's SHA-256, or None when the card records none (cards written before hashes were
        kept: loaded, with a warning in the log).

    Raises:
        ValueError: The card records a hash and model.keras does not match it.
    """
    d = Path(model_dir)
    recorded = json.loads((d / "model_card.json").read_text()).get(HASH_KEY)
    if not recorded:
        _log.warning("%s: model_card.json records no %s; model.keras is loaded unverified "
                     "(run scripts/add_model_hashes.py once to record it)", d, HASH_KEY)
        return None
    actual = file_sha256(d / "model.keras")
    if actual != recorded:
        raise ValueError(f"{d}: model.keras has SHA-256 {actual[:12]}… but its card records {recorded[:12]}…; "
                         "the file was changed or replaced after the model was saved. Refusing to load it: "
                         "restore the original file or save the model again")
    return actual


def load_model(model_dir: str | Path):
    """Load a saved model and its card; refuse a missing or inconsistent card, a model.keras whose
    SHA-256 differs from the card's `model_sha256`, and any layer that is not built into Keras
    (safe mode: a Lambda layer's code is never run).

    Returns:
        (keras.Model, ModelCard)

    Raises:
        FileNotFoundError / ValueError with a message saying what is wrong.
    """
    import keras

    d = Path(model_dir)
    if not (d / "model.keras").is_file():
        raise FileNotFoundError(f"{d}: no model.keras here; a model directory holds model.keras + model_card.json")
    card = load_card(d)
    check_model_hash(d)
    try:
        # safe_mode: a Lambda layer (Python bytecode in the file) is refused, never run; unknown layer
        # classes are refused as well. Our models use built-in layers only.
        model = keras.models.load_model(d / "model.keras", compile=False, safe_mode=True)
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise ValueError(f"{d}: refusing to load model.keras: it holds something other than built-in Keras "
                         f"layers (a Lambda layer, custom code or an unknown layer type): {e}") from None
    n_out = model.output_shape[-1]
    if n_out != len(card.classes):
        raise ValueError(f"{d}: model has {n_out} outputs but its card lists {len(card.classes)} classes {card.classes}")
    size = model.input_shape[1]
    if size != card.preprocessing["size"]:
        raise ValueError(f"{d}: model input is {size}px but the card's preprocessing says {card.preprocessing['size']}px")
    for layer in (FEATURES_LAYER, LOGITS_LAYER, card.gradcam_layer):
        try:
            model.get_layer(layer)
        except ValueError:
            raise ValueError(f"{d}: layer {layer!r} named in the card/contract is not in the model") from None
    return model, card
