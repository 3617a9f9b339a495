"""Attention in three dimensions: one ONNX `Attention` node per layer, with its KV cache.

The opset-23 export of a decoder layer computes attention in the heads layout: each projection is
reshaped to [batch, seq, heads, head_dim] and transposed to [batch, heads, seq, head_dim], rotated,
concatenated with the past, and (grouped-query attention) its key and value heads are repeated
with Unsqueeze/Expand/Reshape before `Attention`, whose output is transposed and reshaped back. ONNX
`Attention` (opset 23) does all of that itself when given 3-D inputs and the head counts: it splits
the heads, takes `past_key`/`past_value`, returns `present_key`/`present_value`, and handles
kv_num_heads < q_num_heads. `RotaryEmbedding` takes the same 3-D input with `num_heads`. So per
layer this rewrite replaces

    MatMul -> Reshape -> Transpose [-> RotaryEmbedding] [-> Concat(past)] [-> Unsqueeze -> Expand -> Reshape]
    Attention -> Transpose -> Reshape

by `MatMul [-> RotaryEmbedding(3-D)]` into one `Attention(q, k, v, mask, past_key, past_value)` whose
present outputs are the graph's present outputs, and drops the nodes nothing reads any more. The
arithmetic is the same; the graph loses about 17 nodes per layer. A layer that does not have this
exact shape is left as it is (and counted), never guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

HEADS_PERM = [0, 2, 1, 3]


@dataclass
class _Graph:
    producer: dict[str, Any]
    consumers: dict[str, list[Any]]
    outputs: set[str]

    @classmethod
    def of(cls, graph) -> _Graph:
        producer: dict[str, Any] = {}
        consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.output:
                producer[name] = node
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        return cls(producer, consumers, {o.name for o in graph.output})

    def node(self, name: str, op: str):
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op else None

    def only_reader(self, name: str) -> bool:
        return len(self.consumers.get(name, [])) == 1 and name not in self.outputs


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _heads_split(g: _Graph, name: str):
    """`name` = Transpose(0,2,1,3)(Reshape(x)): returns x (the projection in 3-D) or None."""
    transpose = g.node(name, "Transpose")
    if transpose is None or list(_attr(transpose, "perm", [])) != HEADS_PERM:
        return None
    reshape = g.node(transpose.input[0], "Reshape")
    if reshape is None or not g.only_reader(reshape.output[0]) or not g.only_reader(transpose.output[0]):
        return None
    return reshape.input[0]


def _repeated(g: _Graph, name: str) -> str:
    """Strip the grouped-query repeat Unsqueeze -> Expand -> Reshape, if any."""
    reshape = g.node(name, "Reshape")
    expand = g.node(reshape.input[0], "Expand") if reshape is not None else None
    unsqueeze = g.node(expand.input[0], "Unsqueeze") if expand is not None else None
    return unsqueeze.input[0] if unsqueeze is not None else name


def _projection(g: _Graph, name: str, rotary: bool):
    """Follow a key or value input of Attention back to (3-D projection, rotary node or None, past name,
    present name, the Concat node). None when the layer does not have the expected shape."""
    concat = g.node(_repeated(g, name), "Concat")
    if concat is None or len(concat.input) != 2 or _attr(concat, "axis") not in (-2, 2):
        return None
    past, new = concat.input
    rot = None
    if rotary:
        rot = g.node(new, "RotaryEmbedding")
        if rot is None or not g.only_reader(rot.output[0]):
            return None
        new = rot.input[0]
    x = _heads_split(g, new)
    return None if x is None else (x, rot, past, concat.output[0], concat)


def fuse_attention(model) -> dict[str, int]:
    """Rewrite `model` (onnx ModelProto, opset >= 23) in place; returns counts of fused and skipped layers."""
    from onnx import helper

    graph = model.graph
    g = _Graph.of(graph)
    fused, skipped, new_nodes, replaced = 0, 0, {}, set()
    for node in graph.node:
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            continue
        match = _match_layer(g, node)
        if match is None:
            skipped += 1
            continue
        q3, q_rot, k, v, out_transpose, out_reshape, q_heads, kv_heads = match
        prefix = node.name or node.output[0]
        inputs = []
        nodes = []
        if q_rot is not None:
            q_name = prefix + ".q_rotated"
            nodes.append(helper.make_node("RotaryEmbedding", [q3, *q_rot.input[1:]], [q_name],
                                          name=prefix + ".q_rotary", num_heads=q_heads,
                                          interleaved=_attr(q_rot, "interleaved", 0)))
            inputs.append(q_name)
        else:
            inputs.append(q3)
        for part, (x3, rot, _, _, _) in (("k", k), ("v", v)):
            if rot is not None:
                nodes.append(helper.make_node("RotaryEmbedding", [x3, *rot.input[1:]], [f"{prefix}.{part}_rotated"],
                                              name=f"{prefix}.{part}_rotary", num_heads=kv_heads,
                                              interleaved=_attr(rot, "interleaved", 0)))
                inputs.append(f"{prefix}.{part}_rotated")
            else:
                inputs.append(x3)
        mask = node.input[3] if len(node.input) > 3 else ""
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs.update(q_num_heads=q_heads, kv_num_heads=kv_heads)
        nodes.append(helper.make_node("Attention", inputs + [mask, k[2], v[2]],
                                      [out_reshape.output[0], k[3], v[3]], name=prefix + ".fused", **attrs))
        new_nodes[id(node)] = nodes
        replaced.update({id(node), id(out_transpose), id(out_reshape), id(k[4]), id(v[4])})
        fused += 1
    if fused:
        rebuilt = []
        for node in graph.node:
            if id(node) in new_nodes:
                rebuilt.extend(new_nodes[id(node)])
            elif id(node) not in replaced:
                rebuilt.append(node)
        del graph.node[:]
        graph.node.extend(_topological(rebuilt, graph))
        _drop_dead(graph)
    return {"fused": fused, "skipped": skipped}


def _match_layer(g: _Graph, node):
    if len(node.input) < 3 or len(node.output) != 1 or any(i for i in node.input[4:]):
        return None
    if not g.only_reader(node.output[0]):
        return None
    out_transpose = g.consumers[node.output[0]][0]
    if out_transpose.op_type != "Transpose" or list(_attr(out_transpose, "perm", [])) != HEADS_PERM:
        return None
    readers = g.consumers.get(out_transpose.output[0], [])
    if len(readers) != 1 or readers[0].op_type != "Reshape":
        return None
    out_reshape = readers[0]
    q_rot = g.node(node.input[0], "RotaryEmbedding")
    q_src = q_rot.input[0] if q_rot is not None else node.input[0]
    q3 = _heads_split(g, q_src)
    k = _projection(g, node.input[1], rotary=q_rot is not None)
    v = _projection(g, node.input[2], rotary=False)
    if q3 is None or k is None or v is None:
        return None
    q_heads = _attr(q_rot, "num_heads") if q_rot is not None else None
    kv_heads = _attr(k[1], "num_heads") if k[1] is not None else None
    if q_heads is None or kv_heads is None:
        return None  # head counts come from the rotary nodes; without them the layer is left alone
    return q3, q_rot, k, v, out_transpose, out_reshape, q_heads, kv_heads


def _topological(nodes: list, graph) -> list:
    """Order nodes so every input is produced before it is read."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(nodes), []
    while pending:
        progressed = False
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
                progressed = True
            else:
                rest.append(node)
        if not progressed:
            missing = sorted({i for n in rest for i in n.input if i not in available})[:5]
            raise ValueError(f"attention fusion left nodes whose inputs nothing produces: {missing}")
        pending = rest
    return ordered


def _drop_dead(graph) -> None:
    """Remove nodes none of whose outputs is read (repeatedly), and initializers nothing reads."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    unused = [i for i in graph.initializer if i.name not in needed]
    for init in unused:
        graph.initializer.remove(init)

