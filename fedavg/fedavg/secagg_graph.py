"""SecAgg+'s communication graph (Bell, Bonawitz, Gascón, Lepoint and Raykova,
CCS 2020): who masks with whom, and who holds whose shares, in a round of
secure aggregation (fedavg.secagg). Pure Python, no cryptography.

Client i has k neighbours N(i); its neighbourhood N[i] = N(i) ∪ {i} holds
the Shamir shares of its secrets, so t of N[i] must survive to unmask it,
and fewer than t of N(i) colluding with the server learn nothing of it. The
graph is Harary's H(k, n) over the clients in an order the server draws at
random each round: k-regular, and no k − 1 clients removed cut it apart.
With k = n − 1 it is the complete graph, Bonawitz et al.'s protocol.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .trace import TRACE_TERMS

# By default the complete graph up to 20 clients (Bonawitz et al.'s protocol,
# while its O(n²) work is still small), beyond that k = 2⌈log2 n⌉ neighbours.
COMPLETE_UP_TO = 20


def default_neighbors(n: int) -> int:
    """k for rounds of n clients: n − 1 (the complete graph) up to COMPLETE_UP_TO
    clients, else 2⌈log2 n⌉, even and of the order of log n as Bell et al.
    argue (21 clients: 10; 100: 14; 1000: 20; 10^4: 28)."""
    if n <= COMPLETE_UP_TO:
        return max(n - 1, 1)
    return min(n - 1, 2 * math.ceil(math.log2(n)))


def default_threshold(k: int) -> int:
    """t = a majority of a neighbourhood N[i] of k + 1 clients, (k + 1)//2 + 1."""
    return max(2, (k + 1) // 2 + 1)


def harary_graph(order: Sequence[int], k: int) -> dict[int, set[int]]:
    """Harary's graph H(k, n) on the n clients of ``order``, set on a ring in that
    order: each is joined to the ⌊k/2⌋ nearest on either side and, when k is odd,
    to the one half-way round (when k and n are both odd, one client gets k + 1
    neighbours). Every other client has k, and removing fewer than k clients
    leaves the rest connected; k ≥ n − 1 gives the complete graph. {i: N(i)}."""
    ring = _clients(order, "order")
    if len(set(ring)) != len(ring):
        raise ValueError("order: a client is listed twice")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: must be a positive integer, got {k!r}")
    n = len(ring)
    if k >= n - 1:
        return {i: set(ring) - {i} for i in ring}
    graph: dict[int, set[int]] = {i: set() for i in ring}

    def join(p: int, q: int) -> None:
        a, b = ring[p % n], ring[q % n]
        graph[a].add(b)
        graph[b].add(a)
    for p in range(n):
        for step in range(1, k // 2 + 1):
            join(p, p + step)
    if k % 2:
        half = (n + 1) // 2
        for p in range(half):
            join(p, p + half)
    return graph


def closed(graph: Mapping[int, Iterable[int]], i: int) -> set[int]:
    """N[i] = N(i) ∪ {i}: the holders of i's shares, and what i is told about."""
    return set(graph[i]) | {i}


def unmaskable(graph: Mapping[int, Iterable[int]], survivors_u2: Iterable[int], survivors_u3: Iterable[int],
               threshold: int) -> list[str]:
    """Why Σ_{i∈U3} x_i cannot be unmasked, known before any share is asked for
    (empty: it can be). Each b_i (i ∈ U3) needs t holders alive in U3 ∩ N[i];
    each s_sk_j of a dropped j ∈ U2 \\ U3 with a neighbour in U3 needs t in
    U3 ∩ N(j). And U3 must be connected in the graph: the pair masks of a
    part cut off from the rest cancel within it, so unmasking would give the
    server each part's sum, not only the whole."""
    u2, u3 = set(survivors_u2), set(survivors_u3)
    problems = []
    for i in sorted(u3):
        alive = sorted(u3 & closed(graph, i))
        if len(alive) < threshold:
            problems.append(f"b_{i}: only {len(alive)} of the {len(closed(graph, i))} clients of N[{i}] are left, "
                            f"{show_ids(alive)}")
    for j in sorted(u2 - u3):
        alive = sorted(u3 & set(graph[j]))
        if alive and len(alive) < threshold:
            problems.append(f"s_sk_{j}: client {j} dropped, and only {len(alive)} of its {len(set(graph[j]))} "
                            f"neighbours are left, {show_ids(alive)}")
    if u3 and not problems:
        start = min(u3)
        reached, todo = {start}, [start]
        while todo:
            for j in (set(graph[todo.pop()]) & u3) - reached:
                reached.add(j)
                todo.append(j)
        if reached != u3:
            problems.append(f"U3 falls apart in the graph: clients {show_ids(sorted(u3 - reached))} have no path to "
                            f"client {start} through other survivors (the server would learn each part's sum)")
    return problems


def check_graph(neighbors: Mapping[int, Iterable[int]] | None, u1: Iterable[int]) -> dict[int, set[int]]:
    """The graph over U1 as {i: N(i)}: the complete graph when None; otherwise
    checked to be an undirected graph on exactly U1, without loops."""
    members = set(u1)
    if neighbors is None:
        return {i: members - {i} for i in members}
    graph = {i: set(_clients(js, f"neighbors[{i}]")) for i, js in neighbors.items()}
    if set(graph) != members:
        raise ValueError(f"neighbors: must list every client of U1 {show_ids(sorted(members))}, "
                         f"lists {show_ids(sorted(graph))}")
    for i, js in graph.items():
        if i in js or not js <= members or any(i not in graph[j] for j in js):
            raise ValueError(f"neighbors[{i}]: must be other clients of U1, each listing {i} in turn")
    return graph


def show_ids(ids: Sequence[int]) -> str:
    """[1, 2, 3] as is; a longer list cut after TRACE_TERMS, with its length."""
    ids = list(ids)
    return str(ids) if len(ids) <= TRACE_TERMS else str(ids[:TRACE_TERMS])[:-1] + f", … ({len(ids)})]"


def _clients(values: Iterable[Any], field: str) -> list[int]:
    out = list(values)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in out):
        raise ValueError(f"{field}: client indices must be integers")
    return out
