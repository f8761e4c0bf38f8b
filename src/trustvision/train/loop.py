"""The training loop: seeded, resumable, device-agnostic supervised training of an ImageClassifier.

:func:`fit` trains with Adam, AdamW or SGD (momentum 0.9) under a per-epoch cosine (or constant)
learning-rate schedule, evaluates validation accuracy after every epoch, and -- when ``out`` is
given -- writes a resumable training state after every epoch (``out/train_state.pt``: model,
optimizer, epoch, RNG state and history), the final model as a trustvision checkpoint
(``out/model.safetensors`` + ``out/config.json``, loadable with :func:`trustvision.models.load`)
and ``out/results.json``.

Reproducibility: the shuffling order, augmentation and input-dropout masks of epoch ``e`` come from
a generator seeded with ``(seed, e)``; randomness inside the model (dropout layers) comes from the
global torch RNG, which is seeded once, saved with every epoch and restored on resume (inside
``torch.random.fork_rng``, so the caller's RNG state is left untouched). Hence an interrupted run
resumed with ``resume=True`` ends with exactly the weights of an uninterrupted run. A resume is
refused (one line) when the stored run was trained with another seed, batch size, learning rate,
optimizer, weight decay, input dropout, schedule, number of processes, dataset (``train_set.name``),
architecture or model keyword arguments (``model.tv_config``); the training state is read with
``torch.load(weights_only=True)``, so a state file carrying pickled code is refused without running it.

Model hooks used when present (the generative classifiers rely on them):
``training_loss(x, y) -> (loss, logits)``, ``param_groups(lr) -> list[dict]`` (per-group learning
rates / weight decay) and ``after_training(loader)`` (called once after the last epoch with an
iterable of un-augmented training batches ``(x, y)`` on the training device).

NaN guard: a non-finite loss stops training with a one-line error; with ``out`` the weights of the
last finished epoch are restored, kept as the run's checkpoint and named in the message.

Multi-process: started by ``torchrun`` (``WORLD_SIZE > 1``) or inside an initialised process
group, the same :func:`fit` trains data-parallel with DistributedDataParallel (gloo on the CPU,
nccl on CUDA; ``device="cuda"`` means ``cuda:LOCAL_RANK``), e.g.
``torchrun --nproc_per_node 2 -m trustvision.cli train --model ibinn-small --data digits``.
``batch_size`` is the global batch: every rank takes its equal part of each global batch of the
epoch's seeded permutation (:func:`trustvision.train.distributed.shard_order`), the model's
``training_loss`` runs inside DDP's forward so its gradients are all-reduced, and the logged loss
and accuracy are over all ranks. BatchNorm statistics are rank 0's; after ``after_training`` rank
0's weights are broadcast, so every rank ends bit-identical. Only rank 0 writes files (the
training state holds every rank's RNG state, so resuming with the same number of processes is
exact as well).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import pickle
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from trustvision._utils.device import resolve_device
from trustvision.data import TensorImageDataset
from trustvision.errors import TrustVisionError
from trustvision.train.augment import Augment
from trustvision.train.input_dropout import check_keep_prob, drop_pixels

__all__ = [
    "EpochStats",
    "TrainResult",
    "fit",
    "evaluate_accuracy",
    "resolve_device",
    "iter_batches",
    "check_train_args",
    "read_train_state",
    "STATE_FILE",
    "RESULTS_FILE",
]

STATE_FILE = "train_state.pt"
RESULTS_FILE = "results.json"
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclass
class EpochStats:
    """What one epoch did (``epoch`` counts from 1)."""

    epoch: int
    lr: float
    train_loss: float
    train_accuracy: float
    val_accuracy: float | None
    seconds: float


@dataclass
class TrainResult:
    """Outcome of :func:`fit`; ``to_dict()`` is JSON-serialisable (written to ``out/results.json``)."""

    epochs: int
    seed: int
    history: list[EpochStats] = field(default_factory=list)
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    checkpoint: str | None = None
    resumed_from_epoch: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """The metrics stored in the checkpoint's config.json."""
        out = {}
        if self.test_accuracy is not None:
            out["test_accuracy"] = self.test_accuracy
        if self.val_accuracy is not None:
            out["val_accuracy"] = self.val_accuracy
        return out


# --- helpers ------------------------------------------------------------------------------------


def iter_batches(
    dataset: Dataset,
    batch_size: int,
    device: torch.device | str = "cpu",
    order: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images (B,C,H,W), labels (B,))`` on ``device``, in ``order`` (indices) if given.

    In-memory datasets (:class:`~trustvision.data.TensorImageDataset`) are sliced from their
    ``tensors()``; others are streamed through a single-process DataLoader (never read whole).
    """
    if isinstance(dataset, TensorImageDataset):
        images, labels = dataset.tensors()
        n = int(labels.shape[0])
        idx_all = torch.arange(n) if order is None else order
        for start in range(0, len(idx_all), batch_size):
            idx = idx_all[start:start + batch_size]
            yield images[idx].to(device), labels[idx].to(device)
        return
    sampler = None if order is None else order.tolist()
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=0)
    for x, y in loader:
        yield x.to(device).float(), torch.as_tensor(y).to(device).long()


class _Batches:
    """A re-iterable view of a dataset as batches on a device (given to ``after_training``)."""

    def __init__(self, dataset: Dataset, batch_size: int, device: torch.device):
        self.dataset, self.batch_size, self.device = dataset, batch_size, device

    def __iter__(self):
        return iter_batches(self.dataset, self.batch_size, self.device)

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> float:
    """Top-1 accuracy of ``model`` (argmax of its logits) on ``dataset``, in [0, 1].

    The model is put in evaluation mode (no dropout, BatchNorm running statistics) and restored
    to its previous mode afterwards. The model is moved to ``device``.
    """
    if len(dataset) == 0:
        raise TrustVisionError("cannot evaluate on an empty dataset; check the split")
    dev = resolve_device(device)
    was_training = model.training
    model.to(dev).eval()
    correct = total = 0
    try:
        for x, y in iter_batches(dataset, batch_size, dev):
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += int(y.shape[0])
    finally:
        model.train(was_training)
    return correct / total


def _lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """Learning-rate multiplier of epoch ``epoch`` (0-based); epoch 0 always gets the full rate."""
    if schedule == "constant" or epochs <= 1:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))


def _make_optimizer(model: nn.Module, opt: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    hook = getattr(model, "param_groups", None)
    if callable(hook):
        groups = [dict(g) for g in hook(lr)]
        for g in groups:
            g["params"] = list(g["params"])
            g.setdefault("lr", lr)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    if opt == "adam":
        optimizer = torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    elif opt == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    else:
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    for g in optimizer.param_groups:
        g["base_lr"] = g["lr"]
    return optimizer


def check_train_args(epochs, lr, batch_size, opt, weight_decay, sched, grad_clip) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise TrustVisionError(f"epochs must be a whole number >= 1, got {epochs!r} (--epochs)")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise TrustVisionError(f"batch size must be a whole number >= 1, got {batch_size!r} (--batch-size)")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise TrustVisionError(f"learning rate must be a positive number, got {lr!r} (--lr)")
    if opt not in OPTIMIZERS:
        raise TrustVisionError(f"unknown optimizer {opt!r}; use one of {', '.join(OPTIMIZERS)} (--opt)")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise TrustVisionError(f"weight decay must be >= 0, got {weight_decay!r} (--weight-decay)")
    if sched not in SCHEDULES:
        raise TrustVisionError(f"unknown schedule {sched!r}; use one of {', '.join(SCHEDULES)} (--sched)")
    if grad_clip is not None and not grad_clip > 0:
        raise TrustVisionError(f"gradient clipping norm must be > 0, got {grad_clip!r} (--clip-grad)")


def _plain(obj: Any) -> Any:
    """``obj`` as plain JSON values (dicts, lists, str, numbers, bool, None): tuples become lists,
    non-finite floats the strings ``"inf"``, ``"-inf"``, ``"nan"`` (as in config.json), anything
    else its ``repr``. Safe to store in a training state read back with ``weights_only=True``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, (str, bool, int, float)) or obj is None:
        return obj
    if isinstance(obj, numbers.Integral):  # numpy integers and the like
        return int(obj)
    if isinstance(obj, numbers.Real):
        return _plain(float(obj))
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return repr(obj)


def read_train_state(path: Path, device: str | torch.device = "cpu") -> dict:
    """A training state written by :func:`fit`, read with ``torch.load(weights_only=True)`` (a
    pickle carrying code is refused, nothing runs); one-line errors for anything else."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": not the user's concern
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise TrustVisionError(
            f"refusing to read the training state {path}: it holds pickled objects other than "
            "tensors and plain values, and unpickling them could run arbitrary code; delete it or "
            "choose another --out"
        ) from None
    except Exception as exc:  # corrupt or foreign file (e.g. legacy tar format)
        raise TrustVisionError(
            f"cannot read the training state {path} ({type(exc).__name__}); delete it or choose "
            "another --out"
        ) from None
    if not isinstance(state, dict) or state.get("format") != "trustvision-train-state":
        raise TrustVisionError(f"{path} is not a trustvision training state; choose another --out")
    return state


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _can_save_checkpoint(model: nn.Module) -> bool:
    return bool(getattr(model, "tv_config", {}).get("architecture"))


class _Progress:
    """A rich progress bar on stderr (``enabled=True``), one plain line per epoch on stderr
    on stdout (``"lines"``, what ``--no-progress`` gives), or nothing (False)."""

    def __init__(self, enabled: bool | str, label: str):
        self.enabled = enabled
        self.label = label
        self._progress = None

    def __enter__(self):
        if self.enabled is True:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start(self, epoch: int, epochs: int, steps: int):
        if self._progress is None:
            return None
        return self._progress.add_task(f"{self.label}epoch {epoch}/{epochs}", total=steps, info="")

    def advance(self, task, info: str) -> None:
        if self._progress is not None and task is not None:
            self._progress.update(task, advance=1, info=info)

    def log(self, msg: str) -> None:
        if self._progress is not None:
            self._progress.console.print(msg, highlight=False)
        elif self.enabled == "lines":
            print(msg, flush=True)  # stdout, like the final summary; errors alone go to stderr


# --- one run's pieces: resume, one epoch, the training state ----------------------------------


@dataclass
class _Run:
    """The fixed settings of one :func:`fit` call, shared by its helpers."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_set: Dataset
    config: dict
    dev: torch.device
    rank: int
    world: int
    out_dir: Path | None
    fork_devices: list
    seed: int
    epochs: int
    lr: float
    sched: str
    batch_size: int
    augment: Augment | None
    keep_prob: float | None
    fill: torch.Tensor | float
    grad_clip: float | None
    progress: bool | str
    step_module: nn.Module | None = None  # _LossModule(model), wrapped in DDP when distributed

    @property
    def main_rank(self) -> bool:
        return self.rank == 0


def _step_module(model: nn.Module, dev: torch.device, world: int) -> nn.Module:
    """``forward(x, y) -> (loss, logits)`` of ``model`` (:class:`_LossModule`), in
    DistributedDataParallel when there are several processes."""
    module: nn.Module = _LossModule(model)
    if world > 1:
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # the constructor broadcasts rank 0's parameters and buffers: identical start. Buffers
        # are not re-broadcast every step (rank 0's BatchNorm statistics are its own either
        # way); they are copied from rank 0 after every epoch instead.
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in
                   inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers")
        module = DistributedDataParallel(
            module, device_ids=[dev.index] if dev.type == "cuda" else None, **{no_sync: False})
    return module


def _resume(run: _Run, state: dict) -> tuple[int, list[EpochStats]]:
    """Restore the model, optimizer and this rank's RNG state from a training state; returns
    ``(epochs already done, their history)``."""
    try:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise TrustVisionError(
            f"the training state in {run.out_dir} belongs to a different model "
            f"({str(exc).splitlines()[0][:80]}); choose another --out"
        ) from None
    rng_cpu, rng_cuda = state["rng_torch"], state.get("rng_cuda")
    if run.world > 1:
        rng_cpu, rng_cuda = state["rng_ranks"][run.rank]
    torch.set_rng_state(rng_cpu.cpu())
    if run.fork_devices and rng_cuda is not None:
        torch.cuda.set_rng_state(rng_cuda.cpu(), run.fork_devices[0])
    return int(state["epoch"]), [EpochStats(**h) for h in state["history"]]


def _train_one_epoch(run: _Run, epoch: int, bar: _Progress,
                     last_good: int | None) -> tuple[float, float, float]:
    """Train epoch ``epoch`` (0-based) on this rank's share of its seeded permutation; returns
    ``(lr factor, mean train loss, train accuracy)`` over all ranks. A non-finite loss stops
    training through the NaN guard (:func:`_diverged`) with ``last_good`` as the kept epoch."""
    from trustvision.train import distributed  # imported here: `python -m` runs that module

    factor = _lr_factor(run.sched, epoch, run.epochs)
    for g in run.optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    gen = _epoch_generator(run.seed, epoch)
    order = distributed.shard_order(torch.randperm(len(run.train_set), generator=gen),
                                    run.batch_size, run.rank, run.world)
    if run.rank:  # augmentation and input-dropout draws of this rank's own images
        gen = torch.Generator().manual_seed(run.seed * 1_000_003 + int(epoch) + 7_919 * run.rank)
    local_bs = run.batch_size // run.world
    steps = math.ceil(len(order) / local_bs)
    task = bar.start(epoch + 1, run.epochs, steps)
    run.step_module.train()
    dev = run.dev
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), device=dev, dtype=torch.long)
    seen = 0
    for step, (x, y) in enumerate(iter_batches(run.train_set, local_bs, dev, order)):
        if run.augment is not None:
            x = run.augment(x, gen)
        if run.keep_prob is not None:
            x = drop_pixels(x, run.keep_prob, run.fill, gen)
        loss, logits = run.step_module(x, y)
        check = loss.detach().clone()
        if run.world > 1:  # a non-finite loss on any rank stops every rank
            dist.all_reduce(check)
        if not torch.isfinite(check):
            _diverged(run.model, run.out_dir, last_good, epoch, step, float(check), run.lr,
                      run.grad_clip, dev, run.world, run.main_rank, run.train_set, run.config)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if run.grad_clip is not None:
            nn.utils.clip_grad_norm_(run.model.parameters(), run.grad_clip)
        run.optimizer.step()
        b = int(y.shape[0])
        loss_sum += loss.detach() * b
        correct += (logits.detach().argmax(1) == y).sum()
        seen += b
        if run.progress and run.main_rank:
            bar.advance(task, f"loss {float(check) / run.world:.4f}")
    if run.world > 1:
        totals = torch.stack([loss_sum.double(), correct.double(),
                              torch.tensor(float(seen), dtype=torch.float64, device=dev)])
        dist.all_reduce(totals)
        loss_sum, correct, seen = totals[0], totals[1], int(totals[2])
        _broadcast_state(run.model, params=False)  # BatchNorm statistics of rank 0
    return factor, float(loss_sum) / max(seen, 1), float(correct) / max(seen, 1)


def _save_state(run: _Run, epochs_done: int, history: list[EpochStats]) -> None:
    """Write ``out/train_state.pt`` atomically (rank 0): model, optimizer, every rank's RNG
    state and the history after ``epochs_done`` epochs."""
    rng_cuda = torch.cuda.get_rng_state(run.fork_devices[0]) if run.fork_devices else None
    rng_ranks = None
    if run.world > 1:
        rng_ranks = [None] * run.world
        dist.all_gather_object(rng_ranks, (torch.get_rng_state(), rng_cuda))
    if run.main_rank:
        _save_atomic(
            {
                "format": "trustvision-train-state",
                "format_version": 1,
                "epoch": epochs_done,
                "model": run.model.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "rng_torch": torch.get_rng_state(),
                "rng_cuda": rng_cuda,
                **({"rng_ranks": rng_ranks} if run.world > 1 else {}),
                "history": [asdict(h) for h in history],
                "config": run.config,
            },
            run.out_dir / STATE_FILE,
        )


# --- fit ----------------------------------------------------------------------------------------


def fit(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None = None,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    out: str | os.PathLike | None = None,
    resume: bool = False,
    opt: str = "adam",
    weight_decay: float = 0.0,
    input_dropout: float | None = None,
    progress: bool | str = True,
    test_set: Dataset | None = None,
    augment: Augment | None = None,
    sched: str = "cosine",
    grad_clip: float | None = None,
    eval_batch_size: int = 256,
    on_epoch_end: Callable[[EpochStats], None] | None = None,
    progress_label: str = "",
) -> TrainResult:
    """Train ``model`` on ``train_set`` for ``epochs`` epochs; returns a :class:`TrainResult`.

    Args:
        model: an :class:`~trustvision.models.ImageClassifier` (trained in place, left on
            ``device`` in evaluation mode).
        train_set, val_set, test_set: datasets of ``(image (C,H,W) in [0,1], label)``; validation
            accuracy is measured after every epoch, test accuracy once at the end.
        epochs, lr, batch_size: as usual; ``lr`` is the peak rate of the ``sched`` schedule
            (``"cosine"``: per-epoch cosine decay from ``lr`` towards 0; ``"constant"``).
        seed: seeds shuffling, augmentation, input dropout and the model's own randomness.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``...
        out: directory for the training state, final checkpoint and ``results.json``.
        resume: continue from ``out/train_state.pt`` (after the last finished epoch).
        opt: ``"adam"``, ``"adamw"`` or ``"sgd"`` (momentum 0.9); ``weight_decay`` as in torch.
        input_dropout: keep probability in (0, 1] of whole pixels at training time
            (:mod:`trustvision.train.input_dropout`); ``None`` disables it.
        augment: ``aug(x, generator) -> x`` applied to each training batch
            (:mod:`trustvision.train.augment`).
        grad_clip: clip the global gradient norm to this value.
        on_epoch_end: called with each epoch's :class:`EpochStats` after its state is saved.
        progress: True: a rich progress bar on stderr (rank 0 only under torchrun); "lines": one
            plain line per epoch on stderr (no bar); False: nothing.

    Under ``torchrun`` this trains data-parallel (see the module docstring); ``batch_size`` must
    then be a multiple of the number of processes.
    """
    check_train_args(epochs, lr, batch_size, opt, weight_decay, sched, grad_clip)
    keep_prob = None if input_dropout is None else check_keep_prob(input_dropout)
    if len(train_set) == 0:
        raise TrustVisionError("the training set is empty; check the dataset and split")
    dev = resolve_device(device)
    from trustvision.train import distributed  # imported here: `python -m` runs that module

    info, dev = distributed.setup(dev)
    rank, world = (0, 1) if info is None else (info.rank, info.world_size)
    if batch_size % world:
        raise TrustVisionError(
            f"batch size {batch_size} does not split evenly over {world} processes (--batch-size is "
            f"the global batch); use a multiple of {world}"
        )
    if len(train_set) < world:
        raise TrustVisionError(f"the training set has {len(train_set)} images, fewer than the {world} "
                               "processes; use fewer processes")
    main_rank = rank == 0
    out_dir = None if out is None else Path(out)
    config = {
        "epochs": epochs, "lr": float(lr), "batch_size": batch_size, "seed": int(seed), "opt": opt,
        "weight_decay": float(weight_decay), "input_dropout": keep_prob, "sched": sched,
        "grad_clip": grad_clip, "augment": None if augment is None else repr(augment),
        # what the run trains: a resume with another dataset or model is refused
        "dataset": getattr(train_set, "name", None),
        "architecture": (getattr(model, "tv_config", None) or {}).get("architecture"),
        "model_kwargs": _plain((getattr(model, "tv_config", None) or {}).get("kwargs", {})),
    }
    if world > 1:
        config["world_size"] = world

    state = None
    if out_dir is not None:
        state_path = out_dir / STATE_FILE
        if state_path.exists() and not resume:
            raise TrustVisionError(
                f"{out_dir} already holds a training run; pass --resume to continue it or choose "
                "another --out"
            )
        if resume and state_path.exists():
            state = _load_state(state_path, dev, config)
        if main_rank:
            out_dir.mkdir(parents=True, exist_ok=True)
    elif resume:
        raise TrustVisionError("resume needs the run's output directory; pass --out")

    model.to(dev)
    optimizer = _make_optimizer(model, opt, lr, weight_decay)
    fill = getattr(model, "norm_mean", None)
    fill = fill.detach().clone() if isinstance(fill, torch.Tensor) else 0.0
    history: list[EpochStats] = []
    start_epoch = 0
    extra: dict[str, Any] = {}

    fork_devices = [] if dev.type != "cuda" else [dev.index if dev.index is not None else torch.cuda.current_device()]
    run = _Run(model=model, optimizer=optimizer, train_set=train_set, config=config, dev=dev,
               rank=rank, world=world, out_dir=out_dir, fork_devices=fork_devices, seed=int(seed),
               epochs=epochs, lr=lr, sched=sched, batch_size=batch_size, augment=augment,
               keep_prob=keep_prob, fill=fill, grad_clip=grad_clip, progress=progress)
    with torch.random.fork_rng(devices=fork_devices):
        # rank 0 draws the model's own randomness (noise, dropout) exactly as a single process;
        # the other ranks get their own streams
        torch.manual_seed(seed if rank == 0 else int(seed) * 1_000_003 + 7_919 * rank)
        if state is not None:
            start_epoch, history = _resume(run, state)

        run.step_module = _step_module(model, dev, world)

        last_good: int | None = start_epoch or None
        with _Progress(progress if main_rank else False, progress_label) as bar:
            if start_epoch:
                bar.log(f"{progress_label}resuming after epoch {start_epoch}/{epochs} from {out_dir}")
            for epoch in range(start_epoch, epochs):
                t0 = time.perf_counter()
                factor, train_loss, train_acc = _train_one_epoch(run, epoch, bar, last_good)
                val_acc = None
                if val_set is not None and len(val_set) > 0:
                    val_acc = evaluate_accuracy(model, val_set, eval_batch_size, dev)
                stats = EpochStats(
                    epoch=epoch + 1,
                    lr=float(lr * factor),
                    train_loss=train_loss,
                    train_accuracy=train_acc,
                    val_accuracy=val_acc,
                    seconds=time.perf_counter() - t0,
                )
                history.append(stats)
                if out_dir is not None:
                    _save_state(run, epoch + 1, history)
                    last_good = epoch + 1
                val_txt = "" if val_acc is None else f"  val acc {val_acc:.4f}"
                procs = f"  ({world} processes)" if world > 1 else ""
                bar.log(
                    f"{progress_label}epoch {epoch + 1}/{epochs}  loss {stats.train_loss:.4f}  "
                    f"train acc {stats.train_accuracy:.4f}{val_txt}  lr {stats.lr:.2e}  "
                    f"{stats.seconds:.1f}s{procs}"
                )
                if on_epoch_end is not None:
                    on_epoch_end(stats)

        hook = getattr(model, "after_training", None)
        if callable(hook):
            hook(_Batches(train_set, eval_batch_size, dev))
        if world > 1:
            # replicas ran in lock-step, so this is 0; then make them bit-identical regardless
            extra["distributed"] = {"world_size": world, "backend": info.backend,
                                    "param_divergence": _param_divergence(model)}
            _broadcast_state(model, params=True)
    model.eval()

    result = TrainResult(epochs=epochs, seed=int(seed), history=history, resumed_from_epoch=start_epoch,
                         config=config, extra=extra)
    if val_set is not None and len(val_set) > 0:
        result.val_accuracy = evaluate_accuracy(model, val_set, eval_batch_size, dev)
    if test_set is not None and len(test_set) > 0:
        result.test_accuracy = evaluate_accuracy(model, test_set, eval_batch_size, dev)
    if out_dir is not None:
        if _can_save_checkpoint(model):
            if main_rank:
                _save_checkpoint(model, out_dir, train_set, result.metrics(), config)
            result.checkpoint = str(out_dir)
        if main_rank:
            _write_json(result.to_dict(), out_dir / RESULTS_FILE)
    if world > 1:
        dist.barrier()  # every rank returns after rank 0 has written its files
    return result


class _LossModule(nn.Module):
    """``forward(x, y) -> (loss, logits)``: the model's ``training_loss`` hook or cross-entropy.

    Wrapped in DistributedDataParallel under torchrun, so the hook runs through DDP's forward
    and its gradients are all-reduced.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hook = getattr(self.model, "training_loss", None)
        if callable(hook):
            return hook(x, y)
        logits = self.model(x)
        return F.cross_entropy(logits, y), logits


def _broadcast_state(model: nn.Module, params: bool) -> None:
    """Copy rank 0's buffers (and parameters) to every rank."""
    tensors = list(model.buffers()) + (list(model.parameters()) if params else [])
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def _param_divergence(model: nn.Module) -> float:
    """Largest |difference| of any parameter between ranks."""
    worst = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            hi, lo = p.detach().clone(), p.detach().clone()
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            worst = torch.maximum(worst, (hi - lo).abs().max().double().cpu())
    return float(worst)


def _save_checkpoint(model: nn.Module, out_dir: Path, train_set: Dataset, metrics: dict, config: dict,
                     **meta: Any) -> None:
    from trustvision import models

    models.save(
        model,
        out_dir,
        classes=list(getattr(train_set, "classes", []) or []) or None,
        dataset=getattr(train_set, "name", None),
        metrics=metrics,
        training=config,
        **meta,
    )


def _diverged(model: nn.Module, out_dir: Path | None, last_good: int | None, epoch: int, step: int,
              value: float, lr: float, grad_clip: float | None, dev: torch.device, world: int,
              main_rank: bool, train_set: Dataset, config: dict) -> None:
    """The NaN guard: keep the last good weights as a checkpoint and stop with a one-line error."""
    where = f"training diverged: the loss became {value} in epoch {epoch + 1} (step {step + 1})"
    clip = "--clip-grad 1" if grad_clip is None else f"a smaller --clip-grad than {grad_clip}"
    if out_dir is None:
        raise TrustVisionError(f"{where}; no checkpoint was kept (pass --out to keep one); "
                               f"lower --lr (now {lr}) or add {clip}")
    if last_good is None:
        raise TrustVisionError(f"{where}, before any epoch finished, so no checkpoint was kept; "
                               f"lower --lr (now {lr}) or add {clip} and start again")
    state_path = out_dir / STATE_FILE
    state = torch.load(state_path, map_location=dev, weights_only=True)
    model.load_state_dict(state["model"])
    kept = state_path
    if _can_save_checkpoint(model):
        if main_rank:
            _save_checkpoint(model, out_dir, train_set, {}, config, diverged_in_epoch=epoch + 1,
                             epochs_done=last_good)
        kept = out_dir / "model.safetensors"
    if world > 1:
        dist.barrier()  # no rank exits (and gets the job stopped) before rank 0 has written it
    raise TrustVisionError(
        f"{where}; the last good weights (after epoch {last_good}) are kept in {kept}; continue "
        f"from {state_path} with --resume and {clip}, or start again with a lower --lr than {lr}"
    )


def _shown(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_state(path: Path, dev: torch.device, config: dict) -> dict:
    state = read_train_state(path, dev)
    old = state.get("config", {})
    if not isinstance(old, dict):
        raise TrustVisionError(f"{path} is not a trustvision training state; choose another --out")
    for key, what, flag in (("dataset", "dataset", "--data"), ("architecture", "model", "--model"),
                            ("model_kwargs", "model keyword arguments", "--model-kw")):
        if key in old and old[key] != config[key]:
            raise TrustVisionError(
                f"cannot resume {path.parent}: it trains {what} {_shown(old[key])}, not "
                f"{_shown(config[key])}; resume with the same {flag} or choose another --out"
            )
    for key, flag in (("seed", "--seed"), ("batch_size", "--batch-size"), ("lr", "--lr"),
                      ("opt", "--opt"), ("weight_decay", "--weight-decay"),
                      ("input_dropout", "--input-dropout"), ("sched", "--sched")):
        if key in old and old[key] != config[key]:
            raise TrustVisionError(
                f"cannot resume {path.parent}: it was trained with {flag} {old[key]}, not "
                f"{config[key]}; resume with the same settings or choose another --out"
            )
    if old.get("world_size", 1) != config.get("world_size", 1):
        raise TrustVisionError(
            f"cannot resume {path.parent}: it was trained by {old.get('world_size', 1)} processes, not "
            f"{config.get('world_size', 1)}; resume with torchrun --nproc_per_node "
            f"{old.get('world_size', 1)} or choose another --out"
        )
    if int(state["epoch"]) > config["epochs"]:
        raise TrustVisionError(
            f"cannot resume {path.parent}: it already ran {state['epoch']} epochs, more than "
            f"--epochs {config['epochs']}; pass --epochs {state['epoch']} or more"
        )
    return state
