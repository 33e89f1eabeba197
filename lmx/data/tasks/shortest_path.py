"""Shortest path in a small random undirected graph, with a breadth-first-search trace as CoT.

Nodes are single letters A, B, ... Prompt: "Edges A-C,B-D,... Shortest path A->F:". CoT: one step per
dequeued node, "u:v1,v2" listing the neighbours it discovers (alphabetical), steps joined by ';', ending
at the step that discovers the target. Answer: the node sequence "A-C-F". Any shortest path scores 1.
"""

from __future__ import annotations

import string
from collections import deque

import numpy as np

from lmx.data.tasks.base import Problem, TaskBase

NODES = string.ascii_uppercase


def _adjacency(edges: list[tuple[str, str]]) -> dict[str, list[str]]:
    adj: dict[str, list[str]] = {}
    for u, v in edges:
        adj.setdefault(u, []).append(v)
        adj.setdefault(v, []).append(u)
    return {u: sorted(vs) for u, vs in adj.items()}


def bfs(edges: list[tuple[str, str]], source: str, target: str) -> tuple[list[str], list[str]] | None:
    """(trace steps, one shortest path) from source to target, or None if target is unreachable."""
    adj, parent = _adjacency(edges), {source: source}
    queue, steps = deque([source]), []
    while queue:
        u = queue.popleft()
        new = [v for v in adj.get(u, []) if v not in parent]
        steps.append(f"{u}:{','.join(new)}")
        for v in new:
            parent[v] = u
            queue.append(v)
        if target in parent:
            path = [target]
            while path[-1] != source:
                path.append(parent[path[-1]])
            return steps, path[::-1]
    return None


class ShortestPath(TaskBase):
    """`num_edges` distinct random edges over `num_nodes` nodes; source and target at BFS distance
    >= `min_distance` (graphs without such a pair are redrawn)."""

    def __init__(self, num_nodes: int = 8, num_edges: int = 10, min_distance: int = 2, cot: bool = True):
        max_edges = num_nodes * (num_nodes - 1) // 2
        if not 2 <= num_nodes <= len(NODES) or not 1 <= num_edges <= max_edges or min_distance < 1:
            raise ValueError(f"invalid ShortestPath sizes: num_nodes={num_nodes} (2..26), "
                             f"num_edges={num_edges} (1..{max_edges}), min_distance={min_distance}")
        self.num_nodes, self.num_edges, self.min_distance, self.cot = num_nodes, num_edges, min_distance, cot
        self.name = "shortest_path"

    def sample(self, rng: np.random.Generator, n: int) -> list[Problem]:
        return [self._sample_one(rng) for _ in range(n)]

    def _sample_one(self, rng: np.random.Generator) -> Problem:
        nodes = NODES[: self.num_nodes]
        pairs = [(u, v) for i, u in enumerate(nodes) for v in nodes[i + 1 :]]
        while True:
            chosen = sorted(rng.choice(len(pairs), size=self.num_edges, replace=False))
            edges = [pairs[int(k)] for k in chosen]
            s, t = (nodes[int(k)] for k in rng.choice(self.num_nodes, size=2, replace=False))
            found = bfs(edges, s, t)
            if found is not None and len(found[1]) - 1 >= self.min_distance:
                return self.make(edges, s, t)

    def make(self, edges: list[tuple[str, str]], source: str, target: str) -> Problem:
        found = bfs(edges, source, target)
        if found is None:
            raise ValueError(f"{target} is unreachable from {source}")
        steps, path = found
        meta = {"edges": [list(e) for e in edges], "source": source, "target": target,
                "distance": len(path) - 1}
        prompt = f"Edges {','.join(u + '-' + v for u, v in edges)}. Shortest path {source}->{target}:"
        cot = ";".join(steps) if self.cot else ""
        return Problem(prompt=prompt, answer="-".join(path), cot=cot, meta=meta)

    def score(self, problem: Problem, completion: str) -> float:
        text = self.extract_answer(completion)
        if not text:
            return 0.0
        path = [p.strip() for p in text.split("-")]
        m = problem.meta
        edges = {frozenset(e) for e in m["edges"]}
        ok = (path[0] == m["source"] and path[-1] == m["target"] and len(path) - 1 == m["distance"]
              and all(frozenset((u, v)) in edges for u, v in zip(path, path[1:], strict=False)))
        return float(ok)
