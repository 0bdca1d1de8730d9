"""Non-persistent checkpoints on several nodes: each node keeps its ranks' files on its own disk.

Megatron-LM's local checkpoints. ``checkpoint.non_persistent_dir`` is the same path on every node and
a different disk on each; on every node it holds::

    local_step_<N>/        rank_<r>.pt for each rank that ran on this node (and, with checkpoint.local_replicas,
                           for the ranks of the peer nodes it copies), and node.json, written last
    .tmp_local_step_<N>/   being written; removed by the next save

**Format: one file per rank, not DCP.** A DCP checkpoint needs one global ``.metadata`` describing every
shard; with each node's shards on its own disk no node could write or read it, and DCP's planner
writes a replicated tensor once (from one rank), so a node could lack tensors its ranks need. Instead
each rank ``torch.save``-s exactly what it restores itself from: its own entries of the state (the
local shards of DTensors, its RNG). Loading is a copy into this rank's tensors, so a resume from a
node-local checkpoint needs the world size and parallel layout it was saved with; another one falls
back to the persistent checkpoint with a warning (DCP there reshards).

**A save** (every rank): each node's leader (its lowest rank) creates the temp dir; every rank writes
its file and sends the same bytes to its replica holders (point to point over gloo); every rank
reports, and each leader writes ``node.json`` (sizes, sha256, the run's metadata) and renames. The
step counts only when every node committed it (agreed by all ranks); only then are older steps pruned.

**A resume** (every rank): each node's leader lists and verifies the steps on its disk; the newest
step of which every rank's file is on some node (its own, or a replica holder's) wins; a rank whose
file is on another node gets the bytes from a rank there. If none is complete the persistent
checkpoint is used, with a warning naming the nodes and what they lack. Ranks may land on other nodes
after a restart (rendezvous order): files are found by rank, wherever they are.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from trainrun.checkpoint.dcp_io import CheckpointMismatch
from trainrun.checkpoint.layout import fsync_dir, write_text_atomic
from trainrun.checkpoint.separate_qkv import separate_qkv_error
from trainrun.distributed.env import DistEnv, node_index
from trainrun.errors import CheckpointError

logger = logging.getLogger(__name__)

NODE_FILE = "node.json"
"""What a node's step directory holds (files with size and sha256, world size, layout, the run's metadata)."""
_STEP_DIR = re.compile(r"^local_step_(\d+)$")
_RANK_FILE = re.compile(r"^rank_(\d+)\.pt$")


def rank_file(rank: int) -> str:
    """The name of rank ``rank``'s file in a step directory."""
    return f"rank_{rank}.pt"


# ---- where ranks run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankPlace:
    """Where one rank runs."""

    rank: int
    node: int
    host: str


class Topology:
    """Which node each rank runs on in this job, and who writes, reads and copies which files."""

    def __init__(self, places: list[RankPlace]):
        self.places = sorted(places, key=lambda p: p.rank)
        self.nodes = sorted({p.node for p in places})

    def node_of(self, rank: int) -> int:
        """The node rank ``rank`` runs on."""
        return self.places[rank].node

    def ranks_on(self, node: int) -> list[int]:
        """The ranks of ``node``, lowest first."""
        return [p.rank for p in self.places if p.node == node]

    def leader(self, node: int) -> int:
        """The rank that creates, commits and lists ``node``'s directory (its lowest)."""
        return self.ranks_on(node)[0]

    def describe(self, node: int) -> str:
        """'node K (host H)'."""
        hosts = sorted({p.host for p in self.places if p.node == node})
        return f"node {node} (host {', '.join(hosts) or '?'})"

    def replica_holders(self, rank: int, replicas: int) -> list[int]:
        """The ranks that keep a copy of ``rank``'s file: one on each of the next ``replicas`` nodes (ring order)."""
        node = self.node_of(rank)
        position, mine = self.nodes.index(node), self.ranks_on(node).index(rank)
        holders = []
        for offset in range(1, replicas + 1):
            peers = self.ranks_on(self.nodes[(position + offset) % len(self.nodes)])
            holders.append(peers[mine % len(peers)])
        return holders

    def reader(self, rank: int, node: int) -> int:
        """The rank that reads ``rank``'s file from ``node``'s disk: ``rank`` itself if it runs there."""
        if self.node_of(rank) == node:
            return rank
        peers = self.ranks_on(node)
        return peers[rank % len(peers)]


# ---- what the nodes hold, and which step every rank can restore -------------------------------------


@dataclass
class StepFiles:
    """One step directory on one node, as its leader found it."""

    ranks: list[int]
    """Ranks whose file is there and verifies."""
    committed: float
    world_size: int
    layout: dict
    problems: list[str] = field(default_factory=list)
    """Files listed in node.json that are missing or fail verification (or node.json itself)."""


@dataclass
class NodeHoldings:
    """A node's directory of node-local checkpoints, as its leader found it."""

    node: int
    directory: str
    exists: bool
    steps: dict[int, StepFiles]


@dataclass
class LocalPlan:
    """The node-local step every rank restores, and where each rank's file comes from."""

    step: int
    path: Path
    committed: float
    sources: dict[int, int]
    """rank -> the node whose disk holds its file (its own node when it has it)."""
    meta: dict | None = None
    """The run's metadata of that step (trainrun.json's content), the same on every rank."""


def plan_restore(holdings: list[NodeHoldings], topo: Topology, world_size: int, layout: dict,
                 directory: Path) -> tuple[LocalPlan | None, list[str]]:
    """The newest step whose files, for every rank, are on some node; and why newer steps are unusable."""
    notes = []
    for step in sorted({s for h in holdings for s in h.steps}, reverse=True):
        found = {h.node: h.steps[step] for h in holdings if step in h.steps}
        saved = next(iter(found.values()))
        if saved.world_size != world_size or saved.layout != layout:
            notes.append(f"node-local step {step} was saved by {saved.world_size} ranks with layout {saved.layout}, "
                         f"this run has {world_size} with {layout}; node-local checkpoints restore only the same "
                         "world size and layout (the persistent ones reshard)")
            continue
        sources, missing = {}, []
        for rank in range(world_size):
            holders = sorted(node for node, files in found.items() if rank in files.ranks)
            if not holders:
                missing.append(rank)
            else:
                sources[rank] = topo.node_of(rank) if topo.node_of(rank) in holders else holders[0]
        if not missing:
            return LocalPlan(step, directory / f"local_step_{step}", max(f.committed for f in found.values()),
                             sources), notes
        lacking = []
        for h in sorted(holdings, key=lambda h: h.node):
            files = h.steps.get(step)
            if not h.exists:
                lacking.append(f"{topo.describe(h.node)}: {h.directory} does not exist (a replaced node?)")
            elif not h.steps:
                lacking.append(f"{topo.describe(h.node)}: {h.directory} holds no node-local checkpoint "
                               "(emptied, or a replaced node?)")
            elif files is None:
                lacking.append(f"{topo.describe(h.node)}: no local_step_{step} in {h.directory}")
            elif files.problems:
                lacking.append(f"{topo.describe(h.node)}: local_step_{step} is incomplete ("
                               + "; ".join(files.problems[:3]) + ")")
        notes.append(f"node-local step {step} cannot be restored: no node holds the files of rank(s) "
                     f"{', '.join(map(str, missing))} ({'; '.join(lacking) or 'not saved'})")
    return None, notes


def scan(directory: Path, verify: str, node: int) -> NodeHoldings:
    """List and verify the node-local steps in ``directory`` (this node's disk)."""
    steps: dict[int, StepFiles] = {}
    exists = directory.is_dir()
    for path in sorted(directory.iterdir()) if exists else []:
        if (m := _STEP_DIR.match(path.name)) is None:
            continue
        try:
            info = json.loads((path / NODE_FILE).read_text())
            listed = info["files"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            steps[int(m.group(1))] = StepFiles([], 0.0, -1, {}, [f"{NODE_FILE} is missing or unreadable ({err})"])
            continue
        files = StepFiles([], float(info["committed_unix"]), int(info["world_size"]), info["layout"])
        for name, entry in sorted(listed.items()):
            problem = _check_file(path / name, entry, verify)
            if problem is not None:
                files.problems.append(f"{name} {problem}")
            elif (r := _RANK_FILE.match(name)) is not None:
                files.ranks.append(int(r.group(1)))
        steps[int(m.group(1))] = files
    return NodeHoldings(node, str(directory), exists, steps)


def _check_file(path: Path, entry: dict, verify: str) -> str | None:
    try:
        size = path.stat().st_size
    except OSError:
        return "is missing"
    if size != entry["size"]:
        return f"has {size} bytes, expected {entry['size']} (truncated?)"
    if verify == "sha256" and "sha256" in entry and hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
        return "fails its sha256 check (corrupted)"
    return None


# ---- one rank's state as bytes ---------------------------------------------------------------------


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(_flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return flat


def _local(value: object) -> object:
    """What this rank holds of ``value``: a DTensor's local shard, on the CPU, without the storage around a view."""
    if isinstance(value, DTensor):
        value = value.to_local()
    if not isinstance(value, torch.Tensor):
        return value
    value = value.detach()
    if value.device.type != "cpu":
        return value.cpu()
    whole = value.untyped_storage().nbytes() == value.numel() * value.element_size()
    return value if whole and value.is_contiguous() else value.clone()  # torch.save would write the whole storage


def to_bytes(tensors: dict, rank: int, step: int) -> bytes:
    """This rank's entries of ``tensors`` (nested dicts), as a torch.save file's bytes."""
    buffer = io.BytesIO()
    torch.save({"rank": rank, "step": step, "tensors": {k: _local(v) for k, v in _flatten(tensors).items()}}, buffer)
    return buffer.getvalue()


def restore(tensors: dict, data: bytes, rank: int, source: str) -> None:
    """Copy a rank's saved entries (:func:`to_bytes`) into ``tensors`` in place; loads tensors only (no pickle)."""
    try:
        saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        stored = saved["tensors"]
    except Exception as err:  # truncated or garbage file
        raise CheckpointError(f"{source} is unreadable: {type(err).__name__}: {err}") from err
    if saved.get("rank") != rank:
        raise CheckpointError(f"{source} holds rank {saved.get('rank')}'s state, not rank {rank}'s")
    wanted = _flatten(tensors)
    missing = sorted(set(wanted) - set(stored))
    if missing and (old := separate_qkv_error(source, stored)) is not None:
        raise old
    if missing:
        raise CheckpointMismatch(f"{source} lacks {len(missing)} entries (e.g. {missing[:3]})")
    resized = []
    for name, target in wanted.items():
        local = target.to_local() if isinstance(target, DTensor) else target
        value = stored[name]
        if isinstance(local, torch.Tensor) and tuple(local.shape) != tuple(value.shape):
            resized.append(f"{name} {list(value.shape)} -> {list(local.shape)}")
    if resized:
        raise CheckpointMismatch(f"{source} holds {len(resized)} tensors of other shapes (e.g. "
                                 + ", ".join(resized[:3]) + ")")
    with torch.no_grad():
        for name, target in wanted.items():
            local = target.to_local() if isinstance(target, DTensor) else target
            if isinstance(local, torch.Tensor):
                local.copy_(stored[name])


def _write_file(path: Path, data: bytes, with_hash: bool) -> dict:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    entry: dict = {"size": len(data)}
    if with_hash:
        entry["sha256"] = hashlib.sha256(data).hexdigest()
    return entry


# ---- the store -----------------------------------------------------------------------------------------


class NodeLocalStore:
    """Saves non-persistent checkpoints node by node and restores them (see the module's docstring).

    Every method is collective: every rank calls it, in the same order.
    """

    def __init__(self, directory: Path, env: DistEnv, verify: str = "sha256", replicas: int = 0):
        self.directory, self.env, self.verify, self.replicas = directory, env, verify, replicas
        self.rank, self.world_size = env.rank, env.world_size
        # Files travel point to point on a gloo group (host memory), never on the training stream.
        self.group = env.host_group
        if self.group is None and env.backend != "gloo":
            self.group = dist.new_group(backend="gloo")
        self.topo = Topology(self._all_gather(RankPlace(env.rank, node_index(env.rank), socket.gethostname())))
        self.node = self.topo.node_of(self.rank)
        self.is_leader = self.topo.leader(self.node) == self.rank
        replicas = min(replicas, len(self.topo.nodes) - 1)
        self.holders = self.topo.replica_holders(self.rank, replicas)
        """Ranks that keep a copy of this rank's file."""
        self.copies_of = [r for r in range(self.world_size) if self.rank in self.topo.replica_holders(r, replicas)]
        """Ranks whose file this rank keeps a copy of."""

    def __str__(self) -> str:
        return f"{self.directory} (node-local, on each of {len(self.topo.nodes)} nodes)"

    def step_dir(self, step: int) -> Path:
        """The directory of ``step`` on every node."""
        return self.directory / f"local_step_{step}"

    # ---- collectives ----------------------------------------------------------------------------------
    def _all_gather(self, obj: object) -> list:
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _agree_or_raise(self, error: BaseException | None, what: str) -> None:
        """Raise on every rank if ``error`` is set on any, naming the ranks and nodes: CheckpointMismatch if
        any rank's is one (a configuration problem), else CheckpointError."""
        text = None if error is None else f"{type(error).__name__}: {error}"
        gathered = self._all_gather((text, isinstance(error, CheckpointMismatch)))
        failed = [(rank, t) for rank, (t, _) in enumerate(gathered) if t is not None]
        if failed:
            where = "; ".join(f"rank {rank} on {self.topo.describe(self.topo.node_of(rank))}: {t}"
                              for rank, t in failed)
            kind = CheckpointMismatch if any(mismatch for _, mismatch in gathered) else CheckpointError
            raise kind(f"{what}: {where}")

    def _exchange(self, sends: dict[int, bytes], sources: list[int]) -> dict[int, bytes]:
        """Send each payload to its rank and receive one from each of ``sources`` (point to point)."""
        sizes_out = {dst: torch.tensor([len(data)], dtype=torch.int64) for dst, data in sends.items()}
        sizes_in = {src: torch.zeros(1, dtype=torch.int64) for src in sources}
        self._wait([dist.isend(t, dst, group=self.group) for dst, t in sizes_out.items()]
                   + [dist.irecv(t, src, group=self.group) for src, t in sizes_in.items()])
        data_out = {dst: torch.frombuffer(bytearray(data), dtype=torch.uint8) for dst, data in sends.items() if data}
        data_in = {src: torch.empty(int(t.item()), dtype=torch.uint8) for src, t in sizes_in.items() if t.item()}
        self._wait([dist.isend(t, dst, group=self.group) for dst, t in data_out.items()]
                   + [dist.irecv(t, src, group=self.group) for src, t in data_in.items()])
        return {src: data_in[src].numpy().tobytes() if src in data_in else b"" for src in sources}

    @staticmethod
    def _wait(works: list) -> None:
        for work in works:
            work.wait()

    # ---- saving ---------------------------------------------------------------------------------------
    def save(self, step: int, tensors: dict, meta: dict, protect: set[Path] = frozenset(),
             verify: str | None = None) -> Path:
        """Write this rank's file (and its replicas), commit every node's directory, then prune older steps.

        Raises CheckpointError on every rank if any rank or node failed (naming them); the older step stays.
        ``protect`` is accepted for the store interface: only the newest node-local step is kept.
        """
        tmp, final = self.directory / f".tmp_local_step_{step}", self.step_dir(step)
        error: BaseException | None = None
        if self.is_leader:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                for stale in self.directory.glob(".tmp_local_step_*"):
                    shutil.rmtree(stale, ignore_errors=True)  # left by a killed save
                tmp.mkdir()
            except OSError as err:
                error = err
        self._agree_or_raise(error, f"cannot create {tmp}")
        payload, error, files = to_bytes(tensors, self.rank, step), None, {}
        copies = self._exchange({holder: payload for holder in self.holders}, self.copies_of)
        with_hash = (verify or self.verify) == "sha256"
        try:
            for rank, data in [(self.rank, payload), *copies.items()]:
                files[rank_file(rank)] = {**_write_file(tmp / rank_file(rank), data, with_hash),
                                          "replica": rank != self.rank}
        except OSError as err:
            error = err
        written = self._all_gather((files, None if error is None else f"{type(error).__name__}: {error}"))
        try:
            self._agree_or_raise(error, f"saving node-local step {step} to {tmp} failed")
        except CheckpointError:
            if self.is_leader:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        error = None
        if self.is_leader:
            node_files = {name: entry for rank, (rank_files, _) in enumerate(written)
                          if self.topo.node_of(rank) == self.node for name, entry in rank_files.items()}
            try:
                self._commit(step, tmp, final, node_files, meta)
            except OSError as err:
                shutil.rmtree(tmp, ignore_errors=True)
                error = err
        self._agree_or_raise(error, f"committing node-local step {step} in {self.directory} failed")
        if self.is_leader:  # every node committed: the older steps are no longer needed
            for old in self.directory.glob("local_step_*"):
                if old.name != final.name:
                    shutil.rmtree(old, ignore_errors=True)
        return final

    def _commit(self, step: int, tmp: Path, final: Path, files: dict, meta: dict) -> None:
        info = {"format": 1, "step": step, "node": self.node, "host": socket.gethostname(),
                "world_size": meta.get("world_size", self.world_size), "layout": meta.get("layout", {}),
                "files": files, "meta": meta, "committed_unix": time.time()}
        write_text_atomic(tmp / NODE_FILE, json.dumps(info, indent=1, sort_keys=True))
        fsync_dir(tmp)
        old = final.with_name(f".old_{final.name}") if final.exists() else None
        if old is not None:  # a re-save of the same step (after a rollback)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(self.directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    # ---- resuming -------------------------------------------------------------------------------------
    def agree(self, layout: dict) -> LocalPlan | None:
        """The newest node-local step every rank can restore (the same plan on every rank), with its metadata.

        Newer steps that are not complete across the nodes are reported (rank 0) with what each node lacks.
        """
        mine = scan(self.directory, self.verify, self.node) if self.is_leader else None
        holdings = [h for h in self._all_gather(mine) if h is not None]
        plan, notes = plan_restore(holdings, self.topo, self.world_size, layout, self.directory)
        for note in notes:
            logger.warning("%s%s", note, "" if plan else "; using the persistent checkpoints")
        if plan is None:
            return None
        meta_rank = self.topo.leader(min(plan.sources.values()))
        box: list = [None]
        if self.rank == meta_rank:
            try:
                box[0] = json.loads((plan.path / NODE_FILE).read_text())["meta"]
            except (OSError, ValueError, KeyError) as err:
                logger.warning("node-local step %d: %s is unreadable (%s)", plan.step, plan.path / NODE_FILE, err)
        dist.broadcast_object_list(box, src=meta_rank, group=self.group)
        if box[0] is None:
            return None
        plan.meta = box[0]
        return plan

    def load(self, plan: LocalPlan, tensors: dict) -> None:
        """Restore this rank's entries of ``tensors`` from ``plan``'s step: from this node's disk, or sent by a
        rank of the node holding a copy. Raises CheckpointError on every rank if any failed."""
        sends, error = {}, None
        for rank, node in plan.sources.items():
            if rank != self.rank and self.topo.reader(rank, node) == self.rank:
                try:
                    sends[rank] = (plan.path / rank_file(rank)).read_bytes()
                except OSError as err:
                    sends[rank], error = b"", err  # the receiver reports it too
        node = plan.sources[self.rank]
        source = f"{plan.path / rank_file(self.rank)} on {self.topo.describe(node)}"
        sender = [] if node == self.node else [self.topo.reader(self.rank, node)]
        received = self._exchange(sends, sender)
        data = b""
        if sender:
            data = received[sender[0]]
        else:
            try:
                data = (plan.path / rank_file(self.rank)).read_bytes()
            except OSError as err:
                error = err
        try:
            if error is None:
                restore(tensors, data, self.rank, source)
        except CheckpointError as err:  # CheckpointMismatch included
            error = err
        self._agree_or_raise(error, f"loading node-local step {plan.step} failed")
        if sender:
            logger.info("rank %d restored its state of step %d from the copy on %s", self.rank, plan.step,
                        self.topo.describe(node))
