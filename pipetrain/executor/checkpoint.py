"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), resumable under another plan.

**What is saved.** Every rank's stages' parameters and optimizer state, through
``get_state_dict`` (:class:`RankState`), under the full model's parameter names
(``blocks.{i}.*``; a :class:`~pipetrain.executor.stage.StageModule` keeps them) and with the
optimizer state keyed by those names (``flatten_optimizer_state_dict``). Tensor-parallel
(DTensor) and ZeRO (FSDP2) parameters are saved as shards of their global tensors, so a later
run with other pp, dp, tp, zero or stage boundaries loads its own shards of the same global
tensors (DCP reshards). Two things are made plan-independent first:

* a tied parameter (GPT-2's embedding and head) held by blocks on two pipeline ranks is saved
  once, under its owner block's name, and every copy loads from that name (the copies are equal:
  same initial broadcast, same all-reduced gradient, hence the same optimizer state);
* GPT-2's fused qkv projection, whose rows the tensor-parallel split permutes
  (:func:`pipetrain.executor.parallel.parallelize_stage`), is saved in the model's own row order
  (and permuted back on load), with its optimizer state.

The step is saved with them; the data position needs no saving, the sample order being a pure
function of ``(seed, step)`` for a given global batch. Each rank's torch RNG state is saved under
its rank and restored only under the same (pp, dp, tp) layout: under another layout the ranks'
random streams are other streams anyway (only dropout draws from them).

**Atomicity.** ``RUN_DIR/checkpoints/step_{N:08d}.tmp/`` receives DCP's files (one per rank and
``.metadata``, fsynced). Each rank then hashes its own files (sha256) and the hashes are
gathered (the barrier: every rank has written); rank 0 writes ``manifest.json`` into the
directory, renames it to ``step_{N:08d}/`` and then atomically replaces ``latest.json``. A run
killed while saving leaves only a ``.tmp`` directory; a full disk raises a :class:`RunError` and
the previous checkpoint stays.

**Resume** (:func:`find_checkpoint`) takes the newest checkpoint that *verifies* (manifest there,
every file listed present with its checksum), ``latest.json``'s step first, then every other step
directory, newest first, and says which ones it skipped and why. :func:`check_resumable` then
refuses a checkpoint of another model (graph fingerprint), global batch, sequence length, seed or
optimizer. A run directory of the old per-rank format (``step_N/rank{r}.pt``) is refused with one
line: it cannot be resumed, start a fresh run directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipetrain.errors import RunError
from pipetrain.plan import Plan

__all__ = ["FORMAT", "MANIFEST", "checkpoint_dir", "step_dir", "file_sha256", "resume_key", "Found", "find_checkpoint",
           "latest_step", "check_resumable", "same_layout", "write_checkpoint", "read_checkpoint", "RankState",
           "read_model_state"]

#: The manifest's ``format``: a manifest without it (or with another) is not this layout.
FORMAT = "pipetrain-dcp-1"
MANIFEST = "manifest.json"
_METADATA = ".metadata"  # DCP's own index of the checkpoint (FileSystemWriter's name)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resume_key(plan: Plan) -> dict[str, Any]:
    """What a resume must share with the checkpoint: the model, and what fixes the data position.

    The samples of step ``k`` are a function of (seed, global batch, seq_len, k), not of how the
    global batch is cut into dp replicas and micro-batches; the optimizer's state is per optimizer."""
    return {"model": plan.model, "graph_fingerprint": plan.graph_fingerprint, "global_batch": plan.global_batch,
            "seq_len": plan.seq_len, "seed": plan.seed, "optimizer": plan.optimizer}


def _layout(plan: Plan) -> dict[str, Any]:
    """How the checkpoint's writer was split (informative, and for the RNG states)."""
    return {"pp": plan.pp, "dp": plan.dp, "tp": plan.tp, "zero": plan.zero, "boundaries": list(plan.boundaries),
            "schedule": plan.schedule}


def same_layout(found: Found, plan: Plan) -> bool:
    lay = found.manifest.get("layout", {})
    return bool(lay.get("pp") == plan.pp and lay.get("dp") == plan.dp and lay.get("tp") == plan.tp)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RunError(f"could not write {path}: {exc.strerror or exc}; the previous checkpoint is kept: free space on that "
                       "filesystem, or point --run-dir elsewhere") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc``, its causes and contexts, and the per-rank failures DCP gathers into a CheckpointException."""
    out: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or e in out:
            continue
        out.append(e)
        todo += [e.__cause__, e.__context__]
        for wrapped in (getattr(e, "failures", None) or {}).values():  # CheckpointException: rank -> (exception, traceback)
            todo.append(wrapped[0] if isinstance(wrapped, tuple) else getattr(wrapped, "exc", None))
    return out


def _is_failure(exc: BaseException) -> bool:
    """An error to report (DCP's CheckpointException included), not an interrupt or exit."""
    from torch.distributed.checkpoint.api import CheckpointException

    return isinstance(exc, (Exception, CheckpointException))


def _root(exc: BaseException) -> BaseException:
    """The first error in ``exc``'s chain that is not DCP's wrapper of per-rank failures."""
    from torch.distributed.checkpoint.api import CheckpointException

    return next((e for e in _chain(exc) if not isinstance(e, CheckpointException)), exc)


# ----- finding a checkpoint ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Found:
    """The checkpoint a resume uses (its manifest), and the newer ones it skipped with the reason for each."""

    step: int
    manifest: dict[str, Any] = field(default_factory=dict)
    skipped: tuple[tuple[int, str], ...] = ()

    def describe_skipped(self) -> str:
        return "; ".join(f"skipped the checkpoint of step {s}: {why}" for s, why in self.skipped)


def _refuse_old_format(root: Path) -> None:
    old = next((p for p in sorted(root.glob("step_*/rank*.pt"))), None)
    if old is not None:
        raise RunError(f"{root} holds checkpoints in pipetrain's old per-rank format ({old.parent.name}/{old.name}), which "
                       "this version cannot resume: start a fresh run directory (another --run-dir, without --resume)")


def _verify(run_dir: str | Path, step: int) -> str | None:
    """Why the checkpoint of ``step`` cannot be used (None: it verifies)."""
    d = step_dir(run_dir, step)
    mpath = d / MANIFEST
    if not mpath.is_file():
        return "it has no manifest (it was not written completely)"
    try:
        m = json.loads(mpath.read_text())
        files = {str(k): str(v) for k, v in m["files"].items()}
        fmt, mstep = m.get("format"), int(m["step"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"its manifest is corrupt ({type(exc).__name__})"
    if fmt != FORMAT:
        return f"its manifest is of format {fmt!r}, not {FORMAT!r}"
    if mstep != step or _METADATA not in files:
        return "its manifest does not describe this directory"
    for name, digest in sorted(files.items()):
        p = d / name
        if not p.is_file():
            return f"{name} is missing"
        if file_sha256(p) != digest:
            return f"{name} does not match its checksum (truncated or changed after it was written)"
    return None


def find_checkpoint(run_dir: str | Path) -> Found | None:
    """The newest checkpoint in ``run_dir`` that verifies (see module docstring); None when there is
    no checkpoint at all. Raises :class:`RunError` listing each candidate's fault when none verifies."""
    root = checkpoint_dir(run_dir)
    _refuse_old_format(root)
    steps: list[int] = []
    latest = root / "latest.json"
    latest_bad = False
    if latest.is_file():
        try:
            steps.append(int(json.loads(latest.read_text())["step"]))
        except (ValueError, KeyError, TypeError):
            latest_bad = True
    unfinished: list[int] = []
    if root.is_dir():
        names = [p.name[5:] for p in root.glob("step_*") if p.is_dir()]
        steps += [s for s in sorted((int(n) for n in names if n.isdigit()), reverse=True) if s not in steps]
        unfinished = [int(n[:-4]) for n in names if n.endswith(".tmp") and n[:-4].isdigit()]
    skipped: list[tuple[int, str]] = []
    for step in steps:
        why = _verify(run_dir, step)
        if why is None:
            newer = [(s, "it was not finished (the run stopped while saving it)") for s in unfinished if s > step and s not in steps]
            m = json.loads((step_dir(run_dir, step) / MANIFEST).read_text())
            return Found(step=step, manifest=m, skipped=tuple(sorted(skipped + newer, reverse=True)))
        skipped.append((step, why))
    if not skipped:
        if latest_bad:
            raise RunError(f"{latest} is corrupt and no checkpoint directory is left: delete it to start over")
        return None
    raise RunError(f"no checkpoint in {root} verifies: " + "; ".join(f"step {s}: {why}" for s, why in skipped)
                   + ": start without --resume, or use another --run-dir")


def latest_step(run_dir: str | Path) -> int | None:
    """The step ``--resume`` would start from (the newest checkpoint that verifies), or None."""
    found = find_checkpoint(run_dir)
    return None if found is None else found.step


def check_resumable(found: Found, plan: Plan, run_dir: str | Path) -> None:
    """Refuse a checkpoint that ``plan`` cannot continue: another model, or another data position."""
    saved = found.manifest.get("resume", {})
    want = resume_key(plan)
    where = f"the checkpoint of step {found.step} in {checkpoint_dir(run_dir)}"
    fresh = "or start a fresh --run-dir"
    if (saved.get("model"), saved.get("graph_fingerprint")) != (want["model"], want["graph_fingerprint"]):
        raise RunError(f"{where} is of model {saved.get('model')!r} (graph {str(saved.get('graph_fingerprint'))[:12]}), this plan "
                       f"trains {plan.model!r} (graph {plan.graph_fingerprint[:12]}): resume with a plan of that model, {fresh}")
    what = {"global_batch": "global batch (micro-batch size x m x dp, samples)", "seq_len": "seq-len", "seed": "seed",
            "optimizer": "optimizer"}
    for key, name in what.items():
        if saved.get(key) != want[key]:
            raise RunError(f"{where} was trained with {name} {saved.get(key)}, this plan has {want[key]}: the run continues "
                           f"exactly only with the same {name.split(' (')[0]}: re-plan with {saved.get(key)}, {fresh}")


# ----- writing and reading ------------------------------------------------------------------------


def _is_dist() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def write_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], plan: Plan, *, rank: int,
                     fault: Callable[[int, int | str], None] | None = None) -> None:
    """Save ``state`` (this rank's part, from :meth:`RankState.state`) as the checkpoint of ``step``
    (collective: every rank calls it). ``fault`` is the test hook (action ``"save"``: after this
    rank wrote its files, before the manifest)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    final = step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:  # a save of this step that was killed before leaves stale files
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed = _is_dist()
    if distributed:
        dist.barrier()
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp, thread_count=1, sync_files=True),
                 no_dist=not distributed)
        if fault is not None:
            fault(step, "save")
        mine = {p.name: file_sha256(p) for p in sorted(tmp.glob(f"__{rank}_*"))}
        every: list[Any] = [mine]
        if distributed:
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)  # also the barrier: every rank has written and hashed
    except BaseException as exc:  # noqa: BLE001 - DCP raises every rank's write failure on every rank (a BaseException)
        if not _is_failure(exc):
            raise
        if rank == 0:  # a full disk, or a rank lost while saving: no half checkpoint left where rank 0 sees the failure
            shutil.rmtree(tmp, ignore_errors=True)
        os_err = next((e for e in _chain(exc) if isinstance(e, OSError)), None)
        if os_err is not None and not isinstance(os_err, ConnectionError):
            raise RunError(f"could not write the checkpoint of step {step} in {tmp.parent}: {os_err.strerror or os_err}; the "
                           "previous checkpoint is kept: free space on that filesystem, or point --run-dir elsewhere") from None
        raise
    if rank != 0:
        return
    files = {name: digest for part in every for name, digest in part.items()}
    files[_METADATA] = file_sha256(tmp / _METADATA)
    manifest = {"format": FORMAT, "step": step, "world_size": plan.world_size, "resume": resume_key(plan),
                "layout": _layout(plan), "files": dict(sorted(files.items()))}
    _atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    _fsync_dir(tmp)
    if final.exists():  # a checkpoint of this step that did not verify (the resume went back past it)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    _atomic_write(checkpoint_dir(run_dir) / "latest.json", json.dumps({"step": step}).encode())


def read_checkpoint(run_dir: str | Path, found: Found, state: dict[str, Any]) -> None:
    """Load the checkpoint ``found`` into ``state`` in place, each rank its own shards (collective)."""
    import torch.distributed.checkpoint as dcp

    path = step_dir(run_dir, found.step)
    try:
        dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=not _is_dist())
    except BaseException as exc:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        if not _is_failure(exc):
            raise
        cause = _root(exc)
        first = str(cause).strip().splitlines()
        raise RunError(f"the checkpoint of step {found.step} in {path} does not fit this run ({type(cause).__name__}: "
                       f"{first[0] if first else ''}): resume with a plan of the model that wrote it, or start a fresh --run-dir") from None


def read_model_state(run_dir: str | Path, step: int) -> dict[str, Any]:
    """The model's parameters at checkpoint ``step`` as full CPU tensors under the full model's names
    (one process, no process group): for validating a run without final weights."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = step_dir(run_dir, step)
    meta = dcp.FileSystemReader(path).read_metadata()
    prefix = "model."
    state = {k[len(prefix):]: torch.empty(tuple(v.size), dtype=v.properties.dtype)
             for k, v in meta.state_dict_metadata.items() if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": state}, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    return state


class RankState:
    """This rank's part of a checkpoint: its stages' parameters and optimizer state, named as the
    full model names them (see module docstring for ties and GPT-2's qkv rows)."""

    def __init__(self, modules: Iterable[Any], optimizer: Any, ties: Iterable[tuple[str, int, tuple[int, ...]]],
                 masters: dict[int, Any] | None = None) -> None:
        """``masters``: id(module parameter) -> the parameter the optimizer steps instead (fp32
        master weights of low-precision working weights); the checkpoint then holds the masters."""
        from torch import nn

        blocks = {k: b for m in modules for k, b in m.blocks.items()}
        stages = nn.Module()
        # the full model's names, blocks.{i}.*, whatever stages hold them
        stages.blocks = nn.ModuleDict({k: blocks[k] for k in sorted(blocks, key=int)})
        self.masters = masters or {}
        self.working = [p for p in stages.parameters() if id(p) in self.masters]
        self.model = _with_masters(stages, self.masters) if self.masters else stages
        self.optimizer = optimizer
        here = {int(k) for k in blocks}
        #: this rank's name of a tied copy whose owner block is elsewhere -> the owner's name
        self.alias: dict[str, str] = {}
        #: the same for tied copies whose owner block is on this rank too (one tensor under two names)
        self.dup: dict[str, str] = {}
        for name, owner, users in ties:
            for u in users:
                if u in here:
                    (self.dup if owner in here else self.alias)[f"blocks.{u}.{name}"] = f"blocks.{owner}.{name}"
        self.permuted = {f"{n}.c_attn.{leaf}": m.qkv_permutation
                         for n, m in stages.named_modules() if getattr(m, "qkv_permutation", None) is not None
                         for leaf in ("weight", "bias")}

    def _options(self) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(flatten_optimizer_state_dict=True)

    def _get(self) -> tuple[dict[str, Any], dict[str, Any]]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer, options=self._options())
        return msd, osd

    def _param_of(self, key: str) -> str | None:
        """The parameter name a flattened optimizer key belongs to (``state.{fqn}.{k}``, ``param_groups.{fqn}.{k}``)."""
        for head in ("state.", "param_groups."):
            if key.startswith(head):
                return key[len(head):].rpartition(".")[0]
        return None

    def _rename(self, osd: dict[str, Any], drop: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in osd.items():
            p = self._param_of(k)
            if p in self.dup:
                continue
            if p is not None and p in self.alias:
                if drop:
                    continue
                k = _rename_param(k, self.alias, p)
            out[k] = v
        return out

    def state(self, step: int, rank: int) -> dict[str, Any]:
        """The state dict to save (collective over the mesh when GPT-2's qkv rows are tensor-parallel)."""
        import torch

        msd, osd = self._get()
        model = {k: v for k, v in msd.items() if k not in self.dup and k not in self.alias}  # the owner writes a tied copy
        optim = self._rename(osd, drop=True)
        for fqn, perm in self.permuted.items():
            inv = torch.argsort(perm)
            for sd, key in [(model, fqn), *((optim, k) for k in list(optim) if self._param_of(k) == fqn and k.startswith("state."))]:
                if key in sd and _is_dtensor(sd[key]) and sd[key].dim() > 0:
                    sd[key] = sd[key].full_tensor()[inv]
        return {"model": model, "optim": optim, "step": torch.tensor(step), "rng": {f"rank{rank}": torch.get_rng_state()}}

    def load(self, run_dir: str | Path, found: Found, rank: int, restore_rng: bool) -> None:
        """Load checkpoint ``found`` into this rank's stages and optimizer (collective)."""
        import torch
        from torch.distributed.checkpoint.state_dict import set_state_dict

        msd, osd = self._get()
        model = {self.alias.get(k, k): v for k, v in msd.items() if k not in self.dup}
        optim = self._rename(osd, drop=False)
        originals: dict[tuple[str, str], Any] = {}
        for fqn in self.permuted:
            for part, sd in (("model", model), ("optim", optim)):
                for key in [k for k in sd if (k == fqn if part == "model" else self._param_of(k) == fqn and k.startswith("state."))]:
                    if _is_dtensor(sd[key]) and sd[key].dim() > 0:
                        originals[(part, key)] = sd[key]
                        sd[key] = torch.empty(sd[key].shape, dtype=sd[key].dtype)
        state: dict[str, Any] = {"model": model, "optim": optim, "step": torch.tensor(-1)}
        if restore_rng:
            state["rng"] = {f"rank{rank}": torch.get_rng_state()}
        read_checkpoint(run_dir, found, state)
        if int(state["step"]) != found.step:
            raise RunError(f"the checkpoint of step {found.step} in {run_dir} holds step {int(state['step'])}: it is corrupt; "
                           "start a fresh --run-dir")
        for (part, key), orig in originals.items():
            from torch.distributed.tensor import distribute_tensor

            fqn = key if part == "model" else str(self._param_of(key))
            sd = model if part == "model" else optim
            sd[key] = distribute_tensor(sd[key][self.permuted[fqn]].to(orig.device), orig.device_mesh, orig.placements)
        back = {owner: user for user, owner in self.alias.items()}
        model = {back.get(k, k): v for k, v in model.items()}  # back to this rank's names
        optim = {_rename_param(k, back, self._param_of(k)): v for k, v in optim.items()}
        for user, owner in self.dup.items():  # the same tensor as its owner's: set_state_dict wants every name
            model[user] = model[owner]
        set_state_dict(self.model, self.optimizer, model_state_dict=model, optim_state_dict=optim, options=self._options())
        with torch.no_grad():
            for w in self.working:  # the working weights: the loaded masters, rounded to their precision
                w.copy_(self.masters[id(w)])
        if restore_rng:
            torch.set_rng_state(state["rng"][f"rank{rank}"])


def _with_masters(stages: Any, masters: dict[int, Any]) -> Any:
    """A module tree with ``stages``' names holding the optimizer's parameters: each module
    parameter's master where it has one (a tied pair on this rank stays one tensor)."""
    from torch import nn

    root = nn.Module()
    persistent = set(stages.state_dict())
    entries = [(n, t, True) for n, t in stages.named_parameters(remove_duplicate=False)]
    entries += [(n, t, False) for n, t in stages.named_buffers(remove_duplicate=False)]
    for name, t, is_param in entries:
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        if is_param:
            mod.register_parameter(leaf, masters.get(id(t), t))
        else:
            mod.register_buffer(leaf, t, persistent=name in persistent)
    return root


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _rename_param(key: str, names: dict[str, str], param: str | None) -> str:
    """A flattened optimizer key with its parameter name replaced by ``names[param]`` (if listed)."""
    if param is None or param not in names:
        return key
    head = "state." if key.startswith("state.") else "param_groups."
    return head + names[param] + key[len(head) + len(param):]
