"""The installed ONNX model back as a PyTorch module, to fine-tune its last layers.

Written by hand (no ``onnx2torch``, which is not a dependency): insitu's own model
families (``federated.build_model``: ``logistic`` and ``mlp``) export as ``Gemm``
(``Relu``, ``Gemm``)* graphs whose initializers are named after the ``nn.Sequential``
state dict (``0.weight``, ``0.bias``, ``2.weight`` ...). The module is rebuilt from
those names and then *checked*: its outputs must equal ONNX Runtime's on the caller's
rows, or fine-tuning is refused rather than run on a different model.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from insitu.errors import MalformedBundleError

__all__ = ["rebuild_sequential"]

_PARAM = re.compile(r"^(\d+)\.(weight|bias)$")


def rebuild_sequential(model: bytes, check_inputs: np.ndarray) -> nn.Sequential:
    """A ``Sequential`` of ``Linear``/``ReLU`` equal to ``model`` on ``check_inputs``.

    Raises:
        MalformedBundleError: the graph is not a stack of linear layers insitu can rebuild.

    """
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_model_from_string(model)
    ops = [n.op_type for n in proto.graph.node]
    params: dict[int, dict[str, np.ndarray]] = {}
    for init in proto.graph.initializer:
        match = _PARAM.match(init.name)
        if match:
            params.setdefault(int(match.group(1)), {})[match.group(2)] = numpy_helper.to_array(init)
    if not params or set(ops) - {"Gemm", "Relu"} or ops.count("Gemm") != len(params):
        raise MalformedBundleError(
            f"the installed model's graph ({', '.join(ops)}) is not a stack of linear layers; "
            "insitu finetune supports the logistic and mlp families it trains"
        )
    layers: list[nn.Module] = []
    indices = sorted(params)
    for position, index in enumerate(indices):
        weight = params[index]["weight"]
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in params[index])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
            if linear.bias is not None:
                linear.bias.copy_(torch.from_numpy(params[index]["bias"].astype(np.float32)))
        layers.append(linear)
        if position < len(indices) - 1:
            layers.append(nn.ReLU())
    rebuilt = nn.Sequential(*layers)
    _check_equal(model, rebuilt, check_inputs)
    return rebuilt


def _check_equal(model: bytes, rebuilt: nn.Module, inputs: np.ndarray) -> None:
    from insitu._ort import create_session

    session = create_session(model, intra_op_threads=1)
    name = session.get_inputs()[0].name
    sample = np.ascontiguousarray(inputs[:256], dtype=np.float32)
    expected = session.run(None, {name: sample})[0]
    with torch.no_grad():
        got = rebuilt(torch.from_numpy(sample)).numpy()
    if got.shape != expected.shape or not np.allclose(got, expected, atol=1e-4, rtol=1e-4):
        raise MalformedBundleError(
            "the installed model could not be rebuilt for fine-tuning (its outputs differ "
            "from ONNX Runtime's); fine-tune it where it was trained"
        )
