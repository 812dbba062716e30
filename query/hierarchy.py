"""The hierarchy view: a tree of accounts whose nodes' balances are the sums over their subtrees.

Nodes are leaves (accounts: money moves only there) or groups (any other id). ``set_parent(node, parent)``
moves a node (with its subtree) under ``parent`` (a group; an id the view does not know as an account becomes
a group node), or detaches it (``parent=None``). Every edit is logged in the view's LMDB (``tree``: edit
number -> time, node, parent) so the tree as it was at any time can be rebuilt: ``as_of(at_ms)``.

Sums are maintained incrementally: each group node keeps, per currency, [available, reserved, pending_in,
pending_out] of its subtree. The projector's listener adds each changed leaf's delta to its ancestors (work
per changed leaf in the tree, times its depth); an edit moves the node's contribution from its old ancestors
to its new ones. A query of the current balance is two dict lookups, whatever the tree's size.
"""
from __future__ import annotations

import struct
import time
from typing import Any

import msgspec
import numpy as np

from query.projector import Projector
from query.view import id_key

DEPTH_MAX = 64                  # levels in the tree (a move that would exceed it is refused)
NODES_MAX = 10_000_000

Vec = list[int]


class HierarchyError(ValueError):
    """A refused tree edit (a cycle, an account as a parent, too deep): nothing changed."""


def _zero() -> Vec:
    return [0, 0, 0, 0]


class Tree:
    """Parent links and leaf marks (the structure only; no sums)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.children: dict[int, set[int]] = {}
        self.leaf: set[int] = set()

    def move(self, node: int, parent: int | None) -> None:
        old = self.parent.pop(node, None)
        if old is not None:
            self.children[old].discard(node)
        if parent is not None:
            self.parent[node] = parent
            self.children.setdefault(parent, set()).add(node)

    def ancestors(self, node: int) -> list[int]:
        out = []
        p = self.parent.get(node)
        while p is not None:
            out.append(p)
            p = self.parent.get(p)
        return out

    def leaves_under(self, node: int) -> list[int]:
        out = []
        stack = [node]
        while stack:
            n = stack.pop()
            if n in self.leaf:
                out.append(n)
            stack.extend(self.children.get(n, ()))
        return out


class Hierarchy:
    def __init__(self, projector: Projector) -> None:
        self.p = projector
        self.tree = Tree()
        self.sums: dict[int, dict[str, Vec]] = {}
        self.edits: list[tuple[int, int, int | None, bool]] = []   # (ts_ms, node, parent, is_leaf)
        self._leaf_keys = np.zeros(0, dtype="V16")      # the leaves in the tree (rebuilt lazily after edits)
        self._leaf_keys_dirty = True
        self._groups: list[int] = []                     # group index -> node id (the listener's arrays)
        self._gidx: dict[int, int] = {}
        self._anc = np.zeros((0, 0), dtype=np.int64)
        with projector.env.begin(db=projector.dbs["tree"]) as txn:
            for _k, v in txn.cursor():
                ts, node, parent, is_leaf = msgspec.msgpack.decode(bytes(v))
                self.edits.append((ts, int.from_bytes(node, "big"),
                                   int.from_bytes(parent, "big") if parent else None, bool(is_leaf)))
        with projector.lock:
            for _ts, node, parent, is_leaf in self.edits:
                self._apply_edit(node, parent, is_leaf)
            projector.add_listener(self._on_change)

    # ------------------------------------------------------------------------------ contributions
    def _leaf_vec(self, node: int) -> tuple[str, Vec] | None:
        r = self.p.table.get(node)
        if r is None:
            return None
        cur = bytes(r["currency"]).rstrip(b"\0").decode("ascii")
        return cur, [int(r["available"]), int(r["reserved"]), int(r["pending_in"]), int(r["pending_out"])]

    def _contribution(self, node: int) -> dict[str, Vec]:
        if node in self.tree.leaf:
            lv = self._leaf_vec(node)
            return {} if lv is None else {lv[0]: lv[1]}
        return {c: list(v) for c, v in self.sums.get(node, {}).items()}

    def _add(self, nodes: list[int], contrib: dict[str, Vec], sign: int) -> None:
        for a in nodes:
            s = self.sums.setdefault(a, {})
            for cur, vec in contrib.items():
                t = s.setdefault(cur, _zero())
                for i in range(4):
                    t[i] += sign * vec[i]

    def _apply_edit(self, node: int, parent: int | None, is_leaf: bool) -> None:
        """In memory, ``lock`` held: move ``node``'s contribution from its old ancestors to the new ones."""
        if is_leaf:
            self.tree.leaf.add(node)
        contrib = self._contribution(node)
        self._add(self.tree.ancestors(node), contrib, -1)
        self.tree.move(node, parent)
        if parent is not None:
            self._add([parent, *self.tree.ancestors(parent)], contrib, +1)
        if is_leaf and not self._leaf_keys_dirty:
            self._path_of_leaf(node)             # only this leaf's path changed
        else:
            self._leaf_keys_dirty = True         # a group moved: its leaves' paths changed (rebuilt lazily)

    def _path_of_leaf(self, leaf: int) -> None:
        k = np.frombuffer(id_key(leaf), dtype="V16")
        at = int(np.searchsorted(self._leaf_keys, k[0]))
        row = np.full(max(DEPTH_MAX, 1), -1, dtype=np.int64)
        ups = self.tree.ancestors(leaf)
        for d, a in enumerate(ups):
            g = self._gidx.get(a)
            if g is None:
                g = self._gidx[a] = len(self._groups)
                self._groups.append(a)
            row[d] = g
        width = max(self._anc.shape[1], len(ups))
        if width > self._anc.shape[1]:
            pad = np.full((len(self._anc), width - self._anc.shape[1]), -1, dtype=np.int64)
            self._anc = np.concatenate([self._anc, pad], axis=1)
        if at < len(self._leaf_keys) and self._leaf_keys[at] == k[0]:
            self._anc[at] = row[:width]
        else:
            self._leaf_keys = np.insert(self._leaf_keys, at, k)
            self._anc = np.insert(self._anc, at, row[:width], axis=0)

    def _rebuild_paths(self) -> None:
        """The leaves in the tree, sorted (V16 keys), and each one's ancestors as group indexes (``_anc``:
        (leaves, DEPTH_MAX), -1 padded): what the vectorized listener needs. Rebuilt after edits, lazily."""
        leaves = sorted(self.tree.leaf)
        self._leaf_keys = np.array([id_key(n) for n in leaves], dtype="V16")
        self._groups = []
        gidx: dict[int, int] = {}
        self._gidx = gidx
        anc = np.full((len(leaves), DEPTH_MAX), -1, dtype=np.int64)
        for i, leaf in enumerate(leaves):
            for d, a in enumerate(self.tree.ancestors(leaf)):
                g = gidx.get(a)
                if g is None:
                    g = gidx[a] = len(self._groups)
                    self._groups.append(a)
                anc[i, d] = g
        depth = int((anc >= 0).sum(axis=1).max()) if len(leaves) else 0
        self._anc = anc[:, :depth]
        self._leaf_keys_dirty = False

    def _on_change(self, keys: np.ndarray, currency: np.ndarray, old: np.ndarray, new: np.ndarray) -> None:
        """The projector's listener (``lock`` held): add the changed leaves' deltas to their ancestors'
        sums, vectorized: one (group, currency) sum per touched pair, then one dict update per pair."""
        if self._leaf_keys_dirty:
            self._rebuild_paths()
        lk = self._leaf_keys
        if not len(lk) or not self._anc.shape[1]:
            return
        at = np.minimum(np.searchsorted(lk, keys), len(lk) - 1)
        hit = np.flatnonzero(lk[at] == keys)
        if not len(hit):
            return
        delta = new[hit] - old[hit]                         # (k, 4) int64; exact: |values| < 2**61 each
        anc = self._anc[at[hit]]                            # (k, depth)
        curs, cur_i = np.unique(currency[hit], return_inverse=True)
        if float(np.abs(delta.astype(np.float64)).sum(axis=0).max()) >= 2.0 ** 62:
            # sums of this batch could leave int64: exact Python ints, leaf by leaf
            for j, i in enumerate(hit.tolist()):
                node = int.from_bytes(bytes(keys[i]), "big")
                cur = bytes(currency[i]).rstrip(b"\0").decode("ascii")
                self._add(self.tree.ancestors(node), {cur: delta[j].tolist()}, +1)
            return
        depth = anc.shape[1]
        valid = anc >= 0
        pair = (anc * len(curs) + cur_i.reshape(-1, 1))[valid]            # (group, currency) of each addition
        vals = np.repeat(delta[:, None, :], depth, axis=1)[valid]           # (additions, 4)
        order = np.argsort(pair)                           # (any order within a pair: sums commute)
        pair = pair[order]
        starts = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]])
        sums = np.add.reduceat(vals[order], starts, axis=0)
        names = [bytes(c).rstrip(b"\0").decode("ascii") for c in curs]
        groups = self._groups
        for p, vec in zip(pair[starts].tolist(), sums.tolist()):
            g, c = divmod(p, len(curs))
            t = self.sums.setdefault(groups[g], {}).setdefault(names[c], _zero())
            for i in range(4):
                t[i] += vec[i]

    # ------------------------------------------------------------------------------ edits
    def set_parent(self, node_id: int, parent_id: int | None, ts_ms: int | None = None) -> dict[str, Any]:
        """Move ``node_id`` under ``parent_id`` (None: detach). Returns what the node is now."""
        id_key(node_id)
        if parent_id is not None:
            id_key(parent_id)
        ts = int(time.time() * 1000) if ts_ms is None else ts_ms
        if self.edits:
            ts = max(ts, self.edits[-1][0])          # edit times never go back (as_of replays a prefix)
        p = self.p
        with p.write_lock:
            with p.lock:
                is_leaf = node_id in self.tree.leaf or p.table.get(node_id) is not None
                if parent_id is not None:
                    if parent_id == node_id:
                        raise HierarchyError(f"node {node_id} cannot be its own parent")
                    if parent_id in self.tree.leaf or p.table.get(parent_id) is not None:
                        raise HierarchyError(f"{parent_id} is an account: accounts are leaves, a parent is a group")
                    up = self.tree.ancestors(parent_id)
                    if node_id in up:
                        raise HierarchyError(f"moving {node_id} under {parent_id} would make a cycle")
                    if len(up) + 1 + self._height(node_id) > DEPTH_MAX:
                        raise HierarchyError(f"the tree would be deeper than DEPTH_MAX={DEPTH_MAX}")
                if len(self.tree.parent) >= NODES_MAX and node_id not in self.tree.parent:
                    raise HierarchyError(f"the tree holds NODES_MAX={NODES_MAX} nodes")
            rec = msgspec.msgpack.encode([ts, id_key(node_id), id_key(parent_id) if parent_id is not None else b"",
                                          is_leaf])
            with p.env.begin(write=True, db=p.dbs["tree"]) as txn:
                txn.put(struct.pack(">Q", len(self.edits) + 1), rec)
            with p.lock:
                self.edits.append((ts, node_id, parent_id, is_leaf))
                self._apply_edit(node_id, parent_id, is_leaf)
        return {"node_id": node_id, "parent_id": parent_id, "leaf": is_leaf, "ts_ms": ts}

    def _height(self, node: int) -> int:
        h = 0
        level = [node]
        while level:
            level = [c for n in level for c in self.tree.children.get(n, ())]
            if level:
                h += 1
        return h

    # ------------------------------------------------------------------------------ queries
    def balance(self, node_id: int, currency: str) -> dict[str, Any]:
        """The node's current sums for ``currency`` and the seq per shard they reflect (``lock`` taken)."""
        with self.p.lock:
            if node_id in self.tree.leaf:
                lv = self._leaf_vec(node_id)
                vec = lv[1] if lv is not None and lv[0] == currency else _zero()
            elif node_id in self.tree.parent or node_id in self.tree.children:
                vec = list(self.sums.get(node_id, {}).get(currency, _zero()))
            else:
                vec = None
            seqs = dict(self.p.applied)
        return {"node_id": node_id, "currency": currency, "found": vec is not None,
                **dict(zip(("available", "reserved", "pending_in", "pending_out"), vec or _zero())), "seqs": seqs}

    def tree_as_of(self, at_ms: int) -> Tree:
        t = Tree()
        with self.p.lock:
            edits = list(self.edits)
        for ts, node, parent, is_leaf in edits:
            if ts > at_ms:
                break
            if is_leaf:
                t.leaf.add(node)
            t.move(node, parent)
        return t
