"""The ANN half of `clipsearch eval`: recall of the served index against exact neighbours
at each operating point (IVF nprobe, HNSW efSearch, sent as SearchRequest.search_params),
with client-side queries per second, and the report's plot."""

from __future__ import annotations

import re
import time
from pathlib import Path

import grpc
import numpy as np

from clipsearch import recall
from clipsearch.v1 import search_pb2, search_pb2_grpc


def operating_points(index_type: str) -> tuple[str, list[int]]:
    """The knob to sweep and its values for a factory string ("" and [0] when exact)."""
    ivf = re.match(r"IVF(\d+)", index_type)
    if ivf:
        nlist = int(ivf.group(1))
        return "nprobe", [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256) if p <= nlist]
    if "HNSW" in index_type:
        return "ef_search", [16, 32, 64, 128, 256, 512]
    return "", [0]


def ann_sweep(
    server: str,
    queries: np.ndarray,
    targets: np.ndarray,
    index_type: str,
    k: int = 10,
    max_queries: int = 200,
) -> dict:
    """Served unfiltered top-k of vector queries vs exact top-k, per operating point."""
    queries = queries[:max_queries]
    exact = recall.top_k(queries @ targets.T, k)
    knob, values = operating_points(index_type)
    points = []
    with grpc.insecure_channel(server) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)
        for value in values:
            found, started = [], time.perf_counter()
            for q in queries:
                req = search_pb2.SearchRequest(top_k=k)
                req.vector.values.extend(q.tolist())
                if knob:
                    setattr(req.search_params, knob, value)
                found.append([h.id for h in stub.Search(req, timeout=60).hits])
            qps = len(queries) / (time.perf_counter() - started)
            points.append(
                {"param": knob or "exact", "value": value, "qps": round(qps, 1), "found": found}
            )
    return {
        "index_type": index_type,
        "k": k,
        "queries": len(queries),
        "points": points,
        "exact": exact,
    }


def ann_recall(sweep: dict, ids: list[str]) -> dict:
    """Turn a sweep's hit ids into recall@k against the exact neighbour sets."""
    out = []
    for point in sweep["points"]:
        hits = [
            len({ids[j] for j in truth} & set(found)) / max(1, len(truth))
            for truth, found in zip(sweep["exact"], point["found"], strict=True)
        ]
        out.append(
            {k: v for k, v in point.items() if k != "found"}
            | {"recall": round(float(np.mean(hits)), 4)}
        )
    note = ""
    if len(out) > 1 and len({p["recall"] for p in out}) == 1:
        note = "every operating point measured the same recall: search_params may be ignored"
    return {
        "index_type": sweep["index_type"],
        "k": sweep["k"],
        "queries": sweep["queries"],
        "points": out,
        "note": note,
    }


def point_label(point: dict) -> str:
    """ "nprobe=8", "ef_search=64", or "exact"."""
    return "exact" if point["param"] == "exact" else f"{point['param']}={point['value']}"


def plot(report: dict, path: Path) -> None:
    """Served vs offline Recall@K bars, and ANN recall vs QPS (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curve) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels, served, offline = [], [], []
    for direction in ("text_to_image", "image_to_text"):
        for k, value in report["served"][direction].items():
            labels.append(f"{'t→i' if direction == 'text_to_image' else 'i→t'} {k}")
            served.append(value)
            offline.append(report["offline"][direction][k])
    x = np.arange(len(labels))
    bars.bar(x - 0.2, served, 0.4, label="served (live API)")
    bars.bar(x + 0.2, offline, 0.4, label="offline (exact)")
    bars.set_xticks(x, labels, rotation=30, fontsize=8)
    bars.set_ylabel("recall (%)")
    bars.set_title("Recall@K: served vs offline")
    bars.legend(fontsize=8)
    ann = report.get("ann") or {}
    points = ann.get("points", [])
    if points:
        curve.plot([p["qps"] for p in points], [p["recall"] for p in points], "o-")
        for p in points:
            curve.annotate(point_label(p), (p["qps"], p["recall"]), fontsize=7)
    curve.set_xlabel("queries per second (one client, sequential)")
    curve.set_ylabel(f"recall@{ann.get('k', 10)} vs exact")
    curve.set_title(f"ANN operating points ({ann.get('index_type') or 'skipped'})")
    curve.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
