"""The digits example: a no-code ONNX module trained on scikit-learn's bundled ``load_digits``.

``build_digits_onnx`` trains a small MLP (fixed ``random_state``, so every build gives the same
model), converts it with skl2onnx and writes a folder the scoring server can serve without any
entry script:

- ``model.onnx``: input ``float_input`` FP32 ``[-1, F]`` (pixel intensities scaled to 0..1),
  outputs ``label`` (INT64 ``[-1]``) and ``probabilities`` (FP32 ``[-1, 10]``), no ZipMap;
- ``sample.json``: one held-out test digit as ``{"data": [[...F floats...]]}``;
- ``expected.json``: that digit's true label, ``{"label": n}``;
- ``module.json``: the contract's ``ModuleInfo``.

``image_size=8`` is the dataset as bundled (F = 64). ``image_size=28`` upsamples every 8x8 image
to 28x28 (bilinear, ``scipy.ndimage.zoom``) for an MNIST-shaped model with F = 784 inputs and a
128-unit hidden layer; the scoring benchmark uses it as a heavier model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from modules.examples._files import write_classifier_module

INPUT_NAME = "float_input"
SEED = 0


def _dataset(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    if image_size != 8:
        from scipy.ndimage import zoom

        factor = image_size / 8
        images = np.stack([zoom(img, factor, order=1) for img in images]).astype(np.float32)
        images = np.clip(images, 0.0, 1.0)
    return images.reshape(len(images), -1), digits.target.astype(np.int64)


def build_digits_onnx(out_dir: str | Path, image_size: int = 8, name: str | None = None) -> Path:
    """Train, convert and write the digits module into ``out_dir``; return the ``model.onnx`` path.

    The sample is the first test digit the model classifies correctly, so demos show a match;
    ``expected.json`` holds its true label from the dataset, not the model's prediction.
    """
    if image_size not in (8, 28):
        raise ValueError(f"image_size must be 8 (bundled digits) or 28 (upsampled), got {image_size}")
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    name = name or ("digits" if image_size == 8 else f"digits{image_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    x, y = _dataset(image_size)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)
    hidden = (64,) if image_size == 8 else (128,)
    clf = MLPClassifier(hidden_layer_sizes=hidden, max_iter=400, random_state=SEED)
    clf.fit(x_train, y_train)

    n_features = x.shape[1]
    onx = to_onnx(
        clf,
        initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
        options={id(clf): {"zipmap": False}},
        target_opset=17,
    )
    model_path = out / "model.onnx"
    model_path.write_bytes(onx.SerializeToString())

    predicted = clf.predict(x_test)
    hit = int(np.flatnonzero(predicted == y_test)[0])
    sample = {"data": [[float(v) for v in x_test[hit]]]}
    label = int(y_test[hit])
    proba = clf.predict_proba(x_test[hit : hit + 1])[0]
    write_classifier_module(out, name, sample, label, proba)
    return model_path
