"""Expert x domain usage: which domains each expert serves.

Given several domains (a name and a text file each), `domain_usage` routes
the first `max_documents` documents of every domain through a model in
inference mode (`routes.route`, the routing inspector) and counts, per MoE
layer, the (token, expert) pairs each expert received from each domain.
A domain's *share* on an expert is its pairs on that expert over all its
pairs, so each domain's column sums to 1 whatever its size; with top-k
routing it is the fraction of the domain's tokens the expert saw, over `k`.

`top_domains` answers "what does expert 7 do" at the domain level: each
expert's domains by decreasing share. `expert_order` orders the experts by
their domain profile for a heat map: experts grouped by their dominant
domain (the domains in the order given), within a group by decreasing
share of that domain, so that domain-level clusters show as blocks.

Documents. A domain file is UTF-8 text. When it has blank lines, a
document is a group of consecutive non-blank lines (a paragraph, an
article); otherwise each line is a document. Each line of a document is
routed as one row.
"""

import os

import numpy as np

from keras_moe.pipelines.inspection import routes
from keras_moe.validation import check_int


def encode_source(model, tokens):
    """`forward` for a translation model: its encoder alone routes the source tokens."""
    return model.encode(tokens, training=False)["memory"]


def read_documents(path, max_documents=100):
    """The first `max_documents` documents of a text file, each a list of lines.

    Raises:
        FileNotFoundError: naming `path`.
        ValueError: naming `path` when it holds no non-blank line.
    """
    check_int("max_documents", max_documents)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    documents, current = [], []
    if any(not line.strip() for line in lines):
        for line in [*lines, ""]:
            if line.strip():
                current.append(line)
            elif current:
                documents.append(current)
                current = []
    else:
        documents = [[line] for line in lines]
    if not documents:
        raise ValueError(f"{path}: no non-blank line")
    return documents[:max_documents]


def parse_domains(specs):
    """`{name: file}` from `NAME=FILE` strings (or a dict, returned as is), in order.

    Raises:
        ValueError: naming the bad or repeated `--domain`.
    """
    if isinstance(specs, dict):
        return dict(specs)
    domains = {}
    for spec in specs:
        name, sep, path = str(spec).partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--domain must be NAME=FILE. Received: {spec!r}")
        if name in domains:
            raise ValueError(f"--domain {name!r} is given twice")
        domains[name] = path
    if not domains:
        raise ValueError("--domain: name at least one domain (NAME=FILE)")
    return domains


def domain_usage(model, vocabulary, domains, max_documents=100, layer=None, forward=None):
    """Per MoE layer, the pairs each expert received from each domain.

    Args:
        model, vocabulary, layer, forward: as for `routes.route`.
        domains: `{name: file}` (or `NAME=FILE` strings).
        max_documents: int >= 1, documents read per domain.

    Returns:
        dict with `domains` (names), `documents` and `tokens` (per domain)
        and `layers`: `{layer name: {"counts": [E][D] lists, "shares":
        [E][D] lists}}`.
    """
    domains = parse_domains(domains)
    counts, documents, tokens = {}, [], []
    for index, path in enumerate(domains.values()):
        docs = read_documents(path, max_documents)
        lines = [line for doc in docs for line in doc if line.strip()]
        result = routes.route(model, lines, vocabulary, layer=layer, details=False,
                              forward=forward)
        documents.append(len(docs))
        tokens.append(sum(len(row) for row in result["token_ids"]))
        for layer_name, layer_result in result["layers"].items():
            table = counts.setdefault(
                layer_name, np.zeros((layer_result["num_experts"], len(domains))))
            table[:, index] = [e["count"] for e in layer_result["experts"]]
    layers = {}
    for name, table in counts.items():
        totals = table.sum(axis=0, keepdims=True)
        shares = np.divide(table, totals, out=np.zeros_like(table), where=totals > 0)
        layers[name] = {"counts": table.astype(int).tolist(), "shares": shares.tolist()}
    return {"domains": list(domains), "documents": documents, "tokens": tokens,
            "layers": layers}


def expert_order(shares):
    """Experts grouped by dominant domain (column order), then by decreasing share of it.

    Example:

    >>> expert_order([[0.1, 0.5], [0.6, 0.1], [0.3, 0.4]])
    [1, 0, 2]
    """
    shares = np.asarray(shares, np.float64)
    dominant = np.argmax(shares, axis=1)
    strength = shares[np.arange(len(shares)), dominant]
    return sorted(range(len(shares)), key=lambda e: (dominant[e], -strength[e], e))


def top_domains(usage, top=3):
    """Per layer, per expert: its `top` domains by decreasing share (zero shares left out).

    Returns:
        `{layer name: [[{"domain", "share", "count"}, ...] per expert]}`.
    """
    out = {}
    for name, layer in usage["layers"].items():
        shares, counts = np.asarray(layer["shares"]), np.asarray(layer["counts"])
        experts = []
        for e in range(shares.shape[0]):
            ranked = [d for d in np.argsort(-shares[e], kind="stable")[:top] if shares[e, d] > 0]
            experts.append([{"domain": usage["domains"][d], "share": float(shares[e, d]),
                             "count": int(counts[e, d])} for d in ranked])
        out[name] = experts
    return out


def format_top_domains(tops):
    """Plain-text lines: per layer, each expert's top domains with their shares."""
    lines = []
    for name, experts in tops.items():
        lines.append(f"{name}: each expert's top domains (share of the domain's routed pairs)")
        for e, ranked in enumerate(experts):
            shown = ", ".join(f"{d['domain']} {d['share']:.3f}" for d in ranked) or "(unused)"
            lines.append(f"  expert {e:3d}: {shown}")
    return "\n".join(lines)


def inspect_domains(model, vocabulary, domains, layer=None, forward=None, max_documents=100):
    """What `keras-moe inspect --domain` adds to its report: usage, top domains, text."""
    usage = domain_usage(model, vocabulary, domains, max_documents, layer, forward)
    tops = top_domains(usage)
    return {"usage": usage, "top_domains": tops, "table": format_top_domains(tops)}
