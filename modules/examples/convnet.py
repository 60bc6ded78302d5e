"""The conv-net example: an inference-bound ONNX model built with ``onnx.helper`` from bundled digits.

scikit-learn's ``load_digits`` images are upsampled to 28x28 (as for ``digits28``) and fed to three
convolution blocks with fixed random filters (seeded He initialisation: 1→32, 32→96 and 96→128 channels,
3x3, ReLU, 2x2 max-pool), then a softmax layer whose weights are a logistic regression fitted on
those features. Every build gives the same model; test accuracy is about 95 %.

It is the "inference-bound" model of the scoring benchmark: ``session.run`` takes a few hundred
microseconds at batch 1 on one CPU, far more than HTTP and JSON, so batching and thread sizing
decide its throughput. The folder has the same files as the digits example:

- ``model.onnx``: input ``image`` FP32 ``[-1, 1, 28, 28]`` (batch dimension dynamic), outputs
  ``label`` (INT64 ``[-1]``) and ``probabilities`` (FP32 ``[-1, 10]``);
- ``sample.json`` ``{"data": [[[[...28x28...]]]]}``, ``expected.json`` and ``module.json``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from modules.examples._files import write_classifier_module

INPUT_NAME = "image"
SIZE = 28
CHANNELS = (1, 32, 96, 128)
SEED = 0


def dataset() -> tuple[np.ndarray, np.ndarray]:
    """Every bundled digit as a [N, 1, 28, 28] float image (0..1, 4 decimals) and its label."""
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = digits.images.astype(np.float32) / 16.0
    big = np.stack([zoom(img, SIZE / 8, order=1) for img in small]).astype(np.float32)
    # Rounded to 4 decimals, as the sample is written: the sample's answer is what the model gives.
    images = np.round(np.clip(big, 0.0, 1.0), 4).astype(np.float32)
    return images[:, None, :, :], digits.target.astype(np.int64)


def _feature_nodes(rng: np.random.Generator) -> tuple[list, list]:
    """Conv → ReLU → MaxPool twice, then Flatten into ``features``; returns (nodes, initializers)."""
    from onnx import helper, numpy_helper

    nodes, weights = [], []
    previous = INPUT_NAME
    for i, (c_in, c_out) in enumerate(itertools.pairwise(CHANNELS)):
        w = (rng.standard_normal((c_out, c_in, 3, 3)) * np.sqrt(2.0 / (c_in * 9))).astype(np.float32)
        b = np.zeros(c_out, np.float32)
        weights += [numpy_helper.from_array(w, f"conv{i}_w"), numpy_helper.from_array(b, f"conv{i}_b")]
        nodes += [
            helper.make_node("Conv", [previous, f"conv{i}_w", f"conv{i}_b"], [f"conv{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]),
            helper.make_node("MaxPool", [f"relu{i}"], [f"pool{i}"], kernel_shape=[2, 2], strides=[2, 2]),
        ]
        previous = f"pool{i}"
    nodes.append(helper.make_node("Flatten", [previous], ["features"], axis=1))
    return nodes, weights


def _model(nodes: list, weights: list, outputs: list) -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        "convnet",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 1, SIZE, SIZE])],
        outputs,
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def build_convnet_onnx(out_dir: str | Path, name: str = "convnet") -> Path:
    """Build, fit and write the conv-net module into ``out_dir``; return the ``model.onnx`` path."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x, y = dataset()
    nodes, weights = _feature_nodes(np.random.default_rng(SEED))
    feature_out = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", None])
    cpu = ["CPUExecutionProvider"]
    features = ort.InferenceSession(_model(nodes, weights, [feature_out]), providers=cpu).run(
        None, {INPUT_NAME: x}
    )[0]
    scale = float(features.std()) or 1.0

    idx_train, idx_test = train_test_split(np.arange(len(x)), test_size=0.25, random_state=SEED, stratify=y)
    clf = LogisticRegression(max_iter=2000, C=0.1)
    clf.fit(features[idx_train] / scale, y[idx_train])

    head_w = (clf.coef_.T / scale).astype(np.float32)
    head_b = clf.intercept_.astype(np.float32)
    weights += [numpy_helper.from_array(head_w, "head_w"), numpy_helper.from_array(head_b, "head_b")]
    nodes += [
        helper.make_node("Gemm", ["features", "head_w", "head_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
    ]
    outputs = [
        helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10]),
    ]
    model_path = out / "model.onnx"
    model_path.write_bytes(_model(nodes, weights, outputs))

    session = ort.InferenceSession(str(model_path), providers=cpu)
    labels, proba = session.run(None, {INPUT_NAME: x[idx_test]})
    hit = int(np.flatnonzero(labels == y[idx_test])[0])
    item = x[idx_test][hit]
    sample = {"data": item[None].tolist()}
    label = int(y[idx_test][hit])
    write_classifier_module(out, name, sample, label, proba[hit])
    return model_path
