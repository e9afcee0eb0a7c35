"""ONNX export and import of fastnn MLPs (needs the ``onnx`` package: ``fastnn[onnx]``).

``export(model, path)`` writes a ``Sequential`` or a fitted ``fastnn.sklearn`` estimator
as an ONNX graph: each Dense becomes a Gemm (a MatMul when it has no bias) followed by
its activation's op, Dropout is left out (inference), and the output goes through the
link ``predict`` applies (Softmax for cross_entropy, Sigmoid for binary_cross_entropy,
none otherwise). A classifier estimator's graph has the outputs ``label`` and
``probabilities`` (no ZipMap), a regressor's ``variable``, a Sequential's ``output``.

``load(path)`` rebuilds a trainable ``Sequential`` from an MLP-shaped graph: chains of
Gemm or MatMul(+Add) with supported activations, as fastnn, skl2onnx (sklearn's MLPs)
and torch.onnx (an nn.Sequential of Linear and activation layers) write them.
"""
import numpy as np

from .layers import Activation, Dense, Dropout
from .model import Sequential

#: fastnn activation -> ONNX op.
ONNX_OPS = {"identity": "Identity", "sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu",
            "leaky_relu": "LeakyRelu", "softplus": "Softplus", "elu": "Elu"}
#: ONNX op -> fastnn activation (the inverse of ONNX_OPS).
ACTIVATIONS = {op: name for name, op in ONNX_OPS.items()}
#: Activations whose ONNX op carries fastnn's ``alpha`` as its ``alpha`` attribute.
_WITH_ALPHA = ("leaky_relu", "elu")
#: The output link of each loss, as ``Sequential.predict`` applies it.
_LINKS = {"cross_entropy": "Softmax", "binary_cross_entropy": "Sigmoid"}
#: The loss an imported graph's output link implies.
_LOSS_OF_LINK = {"Softmax": "cross_entropy", "Sigmoid": "binary_cross_entropy", None: "mse"}


def _onnx():
    try:
        import onnx
    except ImportError as exc:
        raise ImportError("fastnn.onnx needs the onnx package: pip install 'fastnn[onnx]'"
                          ) from exc
    return onnx


class _GraphBuilder:
    """Nodes and initializers of one graph, with fresh tensor names."""

    def __init__(self, onnx):
        self.onnx = onnx
        self.nodes, self.initializers = [], []
        self._count = 0

    def name(self, stem):
        self._count += 1
        return f"{stem}_{self._count}"

    def constant(self, stem, array):
        name = self.name(stem)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op, inputs, output=None, **attributes):
        output = output or self.name(op.lower())
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [output], **attributes))
        return output

    def activation(self, name, alpha, x):
        attributes = {"alpha": float(alpha)} if name in _WITH_ALPHA else {}
        return self.node(ONNX_OPS[name], [x], **attributes)


def _network_nodes(builder, layers, x):
    """Append the nodes of ``layers`` applied to tensor ``x``; returns the output name."""
    for layer in layers:
        if isinstance(layer, Dense):
            w = builder.constant("W", layer.W)
            if layer.use_bias:
                x = builder.node("Gemm", [x, w, builder.constant("b", layer.b)])
            else:
                x = builder.node("MatMul", [x, w])
            if layer.activation != "identity":
                x = builder.activation(layer.activation, layer.alpha, x)
        elif isinstance(layer, Activation):
            x = builder.activation(layer.activation, layer.alpha, x)
        elif not isinstance(layer, Dropout):  # Dropout is the identity at inference
            raise TypeError(f"cannot export a {type(layer).__name__} layer to ONNX")
    return x


def _classifier_outputs(builder, estimator, prob, dtype):
    """``label`` and ``probabilities`` of a fastnn.sklearn.MLPClassifier from the
    network's linked output ``prob``; returns their value infos."""
    onnx = builder.onnx
    n_classes = len(estimator.classes_)
    if estimator._multilabel:
        builder.node("Identity", [prob], "probabilities")
        above = builder.node("Greater", [prob, builder.constant("half", np.array(0.5, dtype))])
        builder.node("Cast", [above], "label", to=onnx.TensorProto.INT64)
        label_type, label_shape = onnx.TensorProto.INT64, [None, n_classes]
    else:
        if n_classes < 2:
            raise ValueError("cannot export a classifier fitted on a single class to ONNX")
        if n_classes == 2:  # one sigmoid unit: P(classes_[1])
            negative = builder.node("Sub", [builder.constant("one", np.array(1, dtype)), prob])
            builder.node("Concat", [negative, prob], "probabilities", axis=1)
        else:
            builder.node("Identity", [prob], "probabilities")
        best = builder.node("ArgMax", ["probabilities"], axis=1, keepdims=0)
        classes = estimator.classes_
        if classes.dtype.kind in "OUS":
            classes = classes.astype(str).astype(object)
        elif classes.dtype.kind in "biu":
            classes = classes.astype(np.int64)
        builder.node("Gather", [builder.constant("classes", classes), best], "label", axis=0)
        label_type = onnx.helper.np_dtype_to_tensor_dtype(
            np.dtype(object) if classes.dtype.kind == "O" else classes.dtype)
        label_shape = [None]
    elem = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    return [onnx.helper.make_tensor_value_info("label", label_type, label_shape),
            onnx.helper.make_tensor_value_info("probabilities", elem, [None, n_classes])]


def to_onnx(model, opset=17):
    """The ONNX graph of a Sequential or a fitted fastnn.sklearn estimator.

    Parameters
    ----------
    model : Sequential, MLPClassifier or MLPRegressor
        The network (an estimator must be fitted).
    opset : int, default 17
        The ONNX opset version.

    Returns
    -------
    onnx.ModelProto
        Input ``X`` (n, n_features) of the model's dtype; the outputs are listed in
        the module docstring.

    Raises
    ------
    TypeError
        ``model`` is neither a Sequential nor a fitted fastnn.sklearn estimator.
    ValueError
        A classifier fitted on a single class.
    ImportError
        The ``onnx`` package is missing.
    """
    onnx = _onnx()
    estimator = None
    if not isinstance(model, Sequential):
        estimator, model = model, _estimator_network(model)
    dtype = model.dtype
    elem = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    builder = _GraphBuilder(onnx)
    out = _network_nodes(builder, model.layers, "X")
    link = _LINKS.get(model.loss.name) if model.loss is not None else None
    if link is not None:
        out = builder.node(link, [out], **({"axis": -1} if link == "Softmax" else {}))
    if estimator is not None and hasattr(estimator, "classes_"):
        outputs = _classifier_outputs(builder, estimator, out, dtype)
    else:
        name = "output" if estimator is None else "variable"
        builder.node("Identity", [out], name)
        outputs = [onnx.helper.make_tensor_value_info(name, elem, [None, model.n_outputs])]
    graph = onnx.helper.make_graph(
        builder.nodes, "fastnn_" + type(estimator or model).__name__,
        [onnx.helper.make_tensor_value_info("X", elem, [None, model.n_features])],
        outputs, builder.initializers)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)],
                                   producer_name="fastnn")
    onnx.checker.check_model(proto)
    return proto


def _estimator_network(estimator):
    if not hasattr(estimator, "_network"):
        raise TypeError(f"model must be a fastnn Sequential or a fitted fastnn.sklearn "
                        f"estimator, got {type(estimator).__name__}")
    if not hasattr(estimator, "coefs_"):
        raise TypeError(f"model must be fitted: this {type(estimator).__name__} is not "
                        f"fitted yet, call fit first")
    return estimator._network()


def export(model, path, opset=17):
    """Write ``model`` (Sequential or fitted fastnn.sklearn estimator) to ``path`` as ONNX.

    Parameters
    ----------
    model : Sequential, MLPClassifier or MLPRegressor
        As for ``to_onnx``.
    path : str or path-like
        The .onnx file to write.
    opset : int, default 17
        The ONNX opset version.

    Returns
    -------
    onnx.ModelProto
        The graph written.
    """
    proto = to_onnx(model, opset)
    _onnx().save_model(proto, path)
    return proto


# ---------------------------------------------------------------------- import

def load(source):
    """A compiled, trainable Sequential rebuilt from an ONNX MLP.

    Its loss follows the graph's output link: Softmax -> cross_entropy, Sigmoid ->
    binary_cross_entropy, none -> mse; the optimizer is Adam (recompile to change).

    Parameters
    ----------
    source : str, path-like, bytes or onnx.ModelProto
        The graph: chains of Gemm or MatMul(+Add) with supported activations (see the
        module docstring).

    Returns
    -------
    Sequential

    Raises
    ------
    ValueError
        The graph is not an MLP that fastnn can rebuild (the message says what).
    """
    onnx = _onnx()
    if isinstance(source, onnx.ModelProto):
        proto = source
    elif isinstance(source, (bytes, bytearray)):
        proto = onnx.load_model_from_string(bytes(source))
    else:
        proto = onnx.load(source)
    graph = proto.graph
    values = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = onnx.numpy_helper.to_array(
                onnx.helper.get_attribute_value(node.attribute[0]))
    inputs = [i.name for i in graph.input if i.name not in values]
    if len(inputs) != 1:
        raise ValueError(f"an MLP graph has one input, got {len(inputs)}: {inputs}")
    layers, weights, link = _read_chain(graph, values, inputs[0],
                                        {o.name for o in graph.output})
    model = Sequential(layers)
    model.set_weights(weights)
    model.compile(loss=_LOSS_OF_LINK[link], optimizer="adam")
    return model


def _attributes(node):
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _read_chain(graph, values, x, graph_outputs):
    """Follow the MLP from tensor ``x``: Dense layers (Gemm, MatMul[+Add]) with their
    activations, then an optional Softmax/Sigmoid link. Anything after the link (label
    post-processing) is ignored; an unsupported op before it raises ValueError.
    Returns (layers, weights, link op or None)."""
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    specs = []  # ("dense", (W, b)) or ("act", (name, alpha))
    while True:
        following = consumers.get(x, [])
        if not following:
            break
        chain = [n for n in following if n.op_type in _CHAIN_OPS]
        if len(chain) != 1 or len(following) > 1:
            final_reshape = len(following) == 1 and following[0].op_type == "Reshape" and \
                following[0].output[0] in graph_outputs  # skl2onnx's regressor output
            if specs and (x in graph_outputs or final_reshape):
                break
            names = sorted({n.op_type for n in following} - _CHAIN_OPS) or \
                sorted(n.op_type for n in following)
            raise ValueError(f"unsupported ONNX op {names[0]!r} (at tensor {x!r}); "
                             f"fastnn.onnx.load reads chains of Gemm, MatMul+Add and the "
                             f"activations {sorted(ACTIVATIONS) + ['Softmax']}")
        x, spec = _read_node(chain[0], values, consumers)
        if spec is not None and spec[0] == "link":
            # What follows the link is label post-processing (ArgMax, ZipMap, ...).
            return (*_layers_from_specs(specs), spec[1][0])
        if spec is not None:
            specs.append(spec)
    return (*_layers_from_specs(specs), None)


def _read_node(node, values, consumers):
    """(output tensor, spec or None) of one chain node."""
    op, attrs = node.op_type, _attributes(node)
    if op == "Gemm":
        if attrs.get("transA", 0):
            raise ValueError("unsupported ONNX Gemm with transA=1")
        W = values[node.input[1]]
        W = (W.T if attrs.get("transB", 0) else W) * attrs.get("alpha", 1.0)
        b = None
        if len(node.input) > 2 and node.input[2]:
            b = np.broadcast_to(values[node.input[2]] * attrs.get("beta", 1.0), W.shape[1:])
        return node.output[0], ["dense", (W, b)]
    if op == "MatMul":
        W, out = values[node.input[1]], node.output[0]
        adds = [n for n in consumers.get(out, []) if n.op_type == "Add"]
        if len(adds) == 1 and len(consumers[out]) == 1:
            add = adds[0]
            bias_name = add.input[1] if add.input[0] == out else add.input[0]
            return add.output[0], ["dense", (W, values[bias_name].reshape(-1))]
        return out, ["dense", (W, None)]
    if op in ("Softmax", "Sigmoid") and _link_position(node, consumers):
        return node.output[0], ["link", (op,)]
    if op in ACTIVATIONS:
        name = ACTIVATIONS[op]
        return node.output[0], ["act", (name, attrs.get("alpha"))]
    # Cast to float (skl2onnx's first op), Identity without a layer, Flatten of 2-D x.
    return node.output[0], None


def _link_position(node, consumers):
    """A Softmax/Sigmoid is the output link when no Dense follows it."""
    seen, frontier = set(), [node.output[0]]
    while frontier:
        name = frontier.pop()
        for nxt in consumers.get(name, []):
            if nxt.op_type in ("Gemm", "MatMul"):
                return False
            if id(nxt) not in seen and nxt.op_type in _CHAIN_OPS:
                seen.add(id(nxt))
                frontier.extend(nxt.output)
    return True


_CHAIN_OPS = {"Gemm", "MatMul", "Softmax", "Cast", "Flatten"} | set(ACTIVATIONS)


def _layers_from_specs(specs):
    """(layers, weights): Dense layers (each activation right after a Dense fused into
    it), standalone Activation layers, and the weights in get_weights() order."""
    dense = [payload for kind, payload in specs if kind == "dense"]
    if not dense:
        raise ValueError("the ONNX graph has no Gemm or MatMul layer")
    dtype = np.result_type(*[W.dtype for W, _ in dense]).name
    if dtype not in ("float32", "float64"):
        raise ValueError(f"ONNX weights must be float32 or float64, got {dtype}")
    layers, weights = [], []
    for i, (kind, payload) in enumerate(specs):
        if kind == "dense":
            W, b = payload
            act = specs[i + 1][1] if i + 1 < len(specs) and specs[i + 1][0] == "act" else None
            layers.append(Dense(W.shape[0], W.shape[1], activation=act and act[0],
                                alpha=act and act[1], use_bias=b is not None, dtype=dtype))
            weights += [W] if b is None else [W, b]
        elif kind == "act" and (i == 0 or specs[i - 1][0] != "dense"):
            layers.append(Activation(payload[0], payload[1], dtype=dtype))
    return layers, weights
