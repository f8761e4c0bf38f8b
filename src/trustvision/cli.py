"""The ``trustvision`` command: train, explain, audit, report, zoo, data.

Every error a user can cause is a :class:`~trustvision.errors.TrustVisionError`; ``main`` prints
it as one line (``error: ...``) and exits with status 2, never with a traceback.
"""

from __future__ import annotations

import sys

import typer

from trustvision._utils.allocator import tune_cpu_allocator
from trustvision.errors import TrustVisionError

#: largest --seed (seeds must fit numpy's and torch's generators everywhere)
SEED_MAX = 2**32 - 1
DEVICE_HELP = "cpu, cuda, cuda:N, mps or auto (cuda when available, else cpu)."

app = typer.Typer(
    name="trustvision",
    help="Trustworthy image classification: train, explain and audit image classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

def _version(value: bool) -> None:
    if value:
        import trustvision

        typer.echo(f"trustvision {trustvision.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Trustworthy image classification: train, explain and audit image classifiers."""


# Each command lives in its own section below; keep one section per command so that
# several people can edit this file without touching each other's code.

# --- data -------------------------------------------------------------------------------------


EMBEDDED_DATASETS = ("digits", "faces", "textures", "shortcut-digits")


@app.command("data")
def data_cmd(
    data_dir: str = typer.Option(None, "--data-dir", help="Root folder of downloadable datasets."),
) -> None:
    """List the datasets: shape, classes and split sizes of those available here."""
    from rich.console import Console
    from rich.table import Table

    from trustvision import data

    table = Table(title="trustvision datasets")
    for col in ("name", "image", "classes", "train / val / test", "source"):
        table.add_column(col)
    for name in data.list_datasets():
        source = "embedded" if name in EMBEDDED_DATASETS else "torchvision files"
        if name.endswith(":PATH"):
            table.add_row(name, "", "", "", "a folder of class sub-folders")
            continue
        try:
            splits = [data.load(name, split=s, root=data_dir) for s in data.SPLITS]
        except TrustVisionError:
            table.add_row(name, "", "", "not on disk", "torchvision format (`train --download`)")
            continue
        ds = splits[0]
        shape = f"{ds.num_channels}x{ds.image_size[0]}x{ds.image_size[1]}"
        sizes = " / ".join(str(len(d)) for d in splits)
        table.add_row(name, shape, str(ds.num_classes), sizes, source)
    Console().print(table)


# --- zoo --------------------------------------------------------------------------------------


@app.command("zoo")
def zoo_cmd(
    models: bool = typer.Option(False, "--models", help="List the registered architectures instead."),
    zoo_dir: str = typer.Option(None, "--zoo-dir", help="Zoo folder (default: $TRUSTVISION_ZOO or the shipped zoo)."),
) -> None:
    """List the pretrained zoo models (load them with `zoo:<name>`), or architectures with --models."""
    from trustvision import models as tv_models

    if models:
        for name in tv_models.list_models():
            typer.echo(name)
        return
    entries = tv_models.list_zoo(zoo_dir)
    if not entries:
        typer.echo("no zoo models found; build them with `python scripts/build_zoo.py`")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="trustvision zoo (load with models.load('zoo:<name>'))")
    for col in ("name", "architecture", "dataset", "test accuracy", "size"):
        table.add_column(col, justify="right" if col in ("test accuracy", "size") else "left")
    for e in entries:
        acc = e["metrics"].get("test_accuracy")
        marked = e["metrics"].get("test_accuracy_marked")  # shortcut sets: clean vs marked test
        acc_text = f"{100 * acc:.1f}%" if isinstance(acc, (int, float)) else "-"
        if isinstance(marked, (int, float)):
            acc_text += f" clean, {100 * marked:.1f}% marked"
        table.add_row(
            e["name"], e["architecture"], str(e["dataset"] or "-"), acc_text,
            f"{e['size_bytes'] / 1e6:.2f} MB",
        )
    Console(width=max(130, Console().width)).print(table)


# --- train ------------------------------------------------------------------------------------


def _parse_model_kw(items: list[str] | None) -> dict:
    """``["widths=16,32", "dropout=0.1"]`` -> ``{"widths": [16, 32], "dropout": 0.1}``."""
    from trustvision._utils.keyvalue import parse_key_values

    return parse_key_values(items, "--model-kw", "dropout=0.1")


@app.command("train")
def train_cmd(
    ctx: typer.Context,
    data: str = typer.Option(None, "--data", "-d", help="Dataset name (see `trustvision data`); required unless --resume finds it in --out."),
    model: str = typer.Option("small-cnn", "--model", "-m", help="Architecture (see `trustvision zoo --models`)."),
    epochs: int = typer.Option(10, "--epochs", help="Number of epochs."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="Peak learning rate."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Mini-batch size."),
    out: str = typer.Option(None, "--out", "--output", "-o", help="Run folder (default runs/<model>-<data>)."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Random seed (initialisation, shuffling, augmentation)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out after its last finished epoch."),
    opt: str = typer.Option("adam", "--opt", help="Optimizer: adam, adamw or sgd (momentum 0.9)."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", "--wd", help="Weight decay."),
    sched: str = typer.Option("cosine", "--sched", help="Learning-rate schedule: cosine or constant."),
    input_dropout: float = typer.Option(None, "--input-dropout", help="Keep probability of whole pixels at training time, in (0, 1] (e.g. 0.8)."),
    ensemble: int = typer.Option(None, "--ensemble", help="Train N members with seeds seed..seed+N-1 and save their averaged ensemble."),
    augment: str = typer.Option(None, "--augment", help="Augmentations, e.g. shift:2,flip."),
    clip_grad: float = typer.Option(None, "--clip-grad", help="Clip the gradient norm to this value."),
    model_kw: list[str] = typer.Option(None, "--model-kw", metavar="KEY=VALUE", help="Extra model argument KEY=VALUE (repeatable)."),
    beta: float = typer.Option(None, "--beta", help="IB-INN trade-off of the Information Bottleneck loss (generative ibinn-* models; default 1). inf = cross-entropy only; 1/D with D = C*H*W (e.g. 0.015625 for 8x8 digits) = exact class-conditional likelihood p(x|y); 0 = label-free mixture likelihood p(x), which cannot classify."),
    data_dir: str = typer.Option(None, "--data-dir", help="Root folder of downloadable datasets."),
    download: bool = typer.Option(False, "--download", help="Allow downloading the dataset."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar: one plain line per finished epoch instead."),
) -> None:
    """Train a model on a dataset; writes a resumable state, the final checkpoint and results.json.

    Multi-GPU / multi-process: torchrun --nproc_per_node N -m trustvision train ... (or
    torchrun's --no-python with the trustvision script); --batch-size is then the global batch.
    """
    from pathlib import Path

    from trustvision._utils.io import ensure_writable_dir
    from trustvision.train import train_by_name

    if out is not None and not out.strip():
        raise TrustVisionError("--out is empty; give the run folder, e.g. --out runs/digits")
    if out is None and data is None:
        raise TrustVisionError("missing --data; name the dataset to train on (`trustvision data` lists them)")
    model_kwargs = _parse_model_kw(model_kw)
    if resume:
        if out is None:
            raise TrustVisionError("--resume needs --out, the run folder to continue")
        # the stored settings of the run, for every option not given on this command line
        from trustvision.train import stored_run_settings

        stored = stored_run_settings(out) or {}
        given = {name for name in ctx.params if _given(ctx, name)}
        names = {"data": "data", "model": "model", "epochs": "epochs", "lr": "lr", "batch_size": "batch_size",
                 "seed": "seed", "opt": "opt", "weight_decay": "weight_decay", "sched": "sched",
                 "input_dropout": "input_dropout", "ensemble": "ensemble", "augment": "augment",
                 "clip_grad": "grad_clip"}
        values = {p: stored[k] for p, k in names.items() if p not in given and k in stored}
        data, model, epochs, lr = (values.get(k, v) for k, v in
                                   (("data", data), ("model", model), ("epochs", epochs), ("lr", lr)))
        batch_size, seed, opt = values.get("batch_size", batch_size), values.get("seed", seed), values.get("opt", opt)
        weight_decay, sched = values.get("weight_decay", weight_decay), values.get("sched", sched)
        input_dropout, ensemble = values.get("input_dropout", input_dropout), values.get("ensemble", ensemble)
        augment, clip_grad = values.get("augment", augment), values.get("clip_grad", clip_grad)
        if "model_kw" not in given and "beta" not in given and isinstance(stored.get("model_kwargs"), dict):
            model_kwargs = dict(stored["model_kwargs"])
        if data is None:
            raise TrustVisionError(f"--resume found no run settings in {out}; pass --data (and the other options "
                                   "of the run) or start the run without --resume")
    out_dir = Path(out) if out else Path("runs") / f"{model.replace(':', '-')}-{data.replace(':', '-').replace('/', '-')}"
    ensure_writable_dir(out_dir, "--out")
    if beta is not None:
        from trustvision.models import is_generative  # decided by the registered class

        if not is_generative(model):
            raise TrustVisionError(f"--beta applies to generative classifiers (ibinn-small, ibinn-cifar, "
                                   f"ibinn-imagenet), not {model!r}; drop --beta")
        if not beta >= 0:
            raise TrustVisionError(f"--beta must be >= 0 (or inf), got {beta}")
        model_kwargs["beta"] = float(beta)
    from trustvision.train import distributed

    try:
        _, result = train_by_name(
            data, model, epochs=epochs, lr=lr, batch_size=batch_size, out=out_dir, seed=seed,
            device=device, resume=resume, opt=opt, weight_decay=weight_decay, sched=sched,
            input_dropout=input_dropout, ensemble=ensemble, augment=augment, grad_clip=clip_grad,
            model_kwargs=model_kwargs, data_root=data_dir, download=download,
            progress="lines" if no_progress else True,
        )
    except TrustVisionError:
        if distributed.rank() != 0:  # under torchrun every rank fails alike; rank 0 says why
            raise typer.Exit(2) from None
        raise
    finally:
        distributed.shutdown()
    if distributed.rank() != 0:
        return
    val = "-" if result.val_accuracy is None else f"{result.val_accuracy:.4f}"
    test = "-" if result.test_accuracy is None else f"{result.test_accuracy:.4f}"
    typer.echo(f"test accuracy {test} (val {val})")
    typer.echo(f"model saved to {out_dir} (load it with trustvision.models.load({str(out_dir)!r}));"
               f" results in {out_dir / 'results.json'}")


# --- audit ------------------------------------------------------------------------------------


def _given(ctx, name: str) -> bool:
    """Whether the option ``name`` was set on the command line (or from the environment)."""
    try:
        source = ctx.get_parameter_source(name)
    except Exception:  # noqa: BLE001 - a click without parameter sources: treat as given
        return True
    return source is not None and getattr(source, "name", str(source)) in ("COMMANDLINE", "ENVIRONMENT")


def _split_names(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _audit_device(device: str) -> str:
    from trustvision._utils.device import resolve_device

    return str(resolve_device(device))


def _parse_check_options(items: list[str] | None) -> dict[str, str]:
    """``["explanations.n=4"]`` -> ``{"explanations.n": "4"}`` (values parsed by the checks' Options)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        check, dot, name = key.strip().partition(".")
        if not sep or not dot or not check or not name:
            raise TrustVisionError(f"--option expects CHECK.KEY=VALUE, got {item!r}; e.g. --option explanations.n=4")
        out[f"{check}.{name}"] = value.strip()
    return out


def _list_checks_text() -> str:
    from trustvision import audit

    lines = []
    for name in audit.list_checks():
        cls = audit.get_check(name)
        lines.append(f"{name:<16} {cls.title}{'' if cls.default else '  (not run by default)'}")
        for key, opt in cls.options.items():
            value, allowed = opt.resolved_default(), opt.resolved_choices()
            default = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            choices = f"; one of {', '.join(map(str, allowed))}" if allowed else ""
            lines.append(f"    --option {name}.{key}=<{opt.type_name}>  {opt.help} (default {default}{choices})")
    return "\n".join(lines)


def _command_line(ctx, fixed: dict[str, list[str]]) -> str:
    """The command as run: ``fixed`` options first (resolved values), then every other parameter
    the user set to a non-default value, in the command's declaration order."""
    import shlex

    argv = ["trustvision", ctx.info_name or ctx.command.name]
    for flag, values in fixed.items():
        for v in values:
            argv += [flag, v]
    fixed_flags = set(fixed)
    for param in ctx.command.params:
        if getattr(param, "param_type_name", "") != "option" or param.name is None:
            continue
        flag = next((o for o in param.opts if o.startswith("--")), param.opts[0])
        if flag in fixed_flags:
            continue
        value = ctx.params.get(param.name)
        if value is None or value == param.default or (param.multiple and not value):
            continue
        if param.is_flag:
            if value:
                argv.append(flag)
            continue
        for v in (value if param.multiple else [value]):
            argv += [flag, str(v)]
    return shlex.join(argv)


@app.command("audit")
def audit_cmd(
    ctx: typer.Context,
    model: list[str] = typer.Option(None, "--model", "-m", metavar="PATH|zoo:NAME", help="Checkpoint path or zoo:NAME (repeatable or comma separated; default: the zoo models of the dataset)."),
    data: str = typer.Option(None, "--data", "-d", help="Dataset name (default: the dataset the models were trained on, else digits)."),
    out: str = typer.Option("trustvision-report", "--out", "--output", "-o", help="Output folder for report.html, results.json and per-check results."),
    checks: str = typer.Option(None, "--checks", help="Comma-separated checks to run (default: all default checks; see --list-checks)."),
    option: list[str] = typer.Option(None, "--option", "-O", metavar="CHECK.KEY=VALUE", help="A check option CHECK.KEY=VALUE (repeatable; --list-checks lists them), e.g. explanations.n=4."),
    compare: str = typer.Option(None, "--compare", help="A second model (checkpoint or zoo:NAME) given to the checks for comparison."),
    n_max: int = typer.Option(None, "--n-max", min=1, help="Use at most N images of each split (a seeded random subset)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    batch_size: int = typer.Option(256, "--batch-size", "-b", min=1, max=1_000_000, help="Inference batch size."),
    num_workers: int = typer.Option(0, "--num-workers", min=0, max=256, help="DataLoader worker processes decoding streamed splits (image folders); 0: in this process. Results do not depend on it."),
    n_bins: int = typer.Option(15, "--n-bins", min=1, max=1000, help="Equal-width confidence bins for ECE/MCE."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Random seed of the checks and of --n-max subsets."),
    data_dir: str = typer.Option(None, "--data-dir", help="Root folder of downloadable datasets."),
    image_size: int = typer.Option(None, "--image-size", min=1, max=8192, help="imagefolder:PATH: the side images are resized / cropped to (default: the model's image size)."),
    crop: float = typer.Option(None, "--crop", min=0.01, max=1.0, help="imagefolder:PATH: resize the shorter side to image-size / CROP and centre-crop (timm's crop_pct, e.g. 0.875: 256 -> 224); default: plain resize."),
    list_checks_: bool = typer.Option(False, "--list-checks", help="List the available checks with their options and exit."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars: one plain line per finished check instead."),
    ray: str = typer.Option(None, "--ray", metavar="auto|ADDRESS", help="Shard per-image work (explanations, attacks, corruptions, SIS, XNN heatmaps) over Ray actors: 'auto' (the RAY_ADDRESS cluster or a local one) or a cluster address; needs pip install \"trustvision[ray]\"."),
    ray_workers: int = typer.Option(None, "--ray-workers", min=1, max=10_000, help="Ray actors (default: one per cluster CPU)."),
    ray_gpus_per_worker: float = typer.Option(0.0, "--ray-gpus-per-worker", min=0.0, max=64.0, help="GPUs per Ray actor (0: CPU actors)."),
) -> None:
    """Audit models on a dataset: writes OUT/report.html (self-contained) and OUT/results.json.

    Rerunning the same command reuses every finished check, so an interrupted audit resumes.
    Exit status: 0 all checks done, 1 some checks failed (see the report), 2 bad input.
    """
    from trustvision import audit, models as tv_models

    if list_checks_:
        typer.echo(_list_checks_text())
        return
    from trustvision._utils.io import ensure_writable_dir

    check_names = [c.name for c in audit.resolve_checks(checks)]
    check_options = _parse_check_options(option)
    names = _split_names(model)
    if model and not names:
        raise TrustVisionError("--model is empty; give a checkpoint path or zoo:NAME (`trustvision zoo` lists them), "
                               "or leave --model out to audit the zoo models of --data")
    ensure_writable_dir(out, "--out")
    if not names:
        dataset = data or "digits"
        names = [e["name"] for e in tv_models.list_zoo() if e.get("dataset") == dataset]
        if not names:
            raise TrustVisionError(f"no zoo model was trained on {dataset!r}; pass --model PATH or zoo:NAME "
                                   "(`trustvision zoo` lists them)")
    loaded = [audit.AuditModel(n, tv_models.load(n), n) for n in dict.fromkeys(names)]
    if data is None:
        trained_on = {(am.model.tv_config or {}).get("dataset") for am in loaded}
        if len(trained_on) != 1 or None in trained_on:
            raise TrustVisionError("cannot tell which dataset to audit on (the models name none or different "
                                   "ones); pass --data NAME")
        data = trained_on.pop()
    cmp = audit.AuditModel(compare, tv_models.load(compare), compare) if compare else None
    dev = _audit_device(device)

    from trustvision import data as tv_data

    from trustvision.cli_explain import image_data_kwargs

    data_kw = image_data_kwargs(data, loaded[0].model, image_size, crop)

    def load_split(split: str):
        return tv_data.load(data, split=split, root=data_dir, **data_kw)

    command = _command_line(ctx, {
        "--model": list(dict.fromkeys(names)), "--data": [data], "--out": [out],
        **({"--checks": [",".join(check_names)]} if checks else {}),
    })
    result = audit.run(
        loaded, audit.LazySplits(load_split), checks=check_names, out=out, device=dev, seed=seed, compare=cmp,
        options={"n_max": n_max, "batch_size": batch_size, "n_bins": n_bins, "num_workers": num_workers,
                 **check_options},
        progress="lines" if no_progress else True, command=command, dataset_name=data,
        ray=ray, ray_workers=ray_workers, ray_gpus_per_worker=ray_gpus_per_worker,
    )
    for m in result.results["models"]:
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in m["metrics"].items())
        typer.echo(f"{m['name']}: {shown or 'no metrics'}")
    typer.echo(f"ran {result.n_computed} checks, reused {result.n_cached}, {result.n_errors} failed")
    typer.echo(f"report: {result.report_path}")
    typer.echo(f"results: {result.results_path}")
    if result.n_errors:
        typer.echo(f"error: {result.n_errors} check(s) failed; details in the report", err=True)
        raise typer.Exit(code=1)


# --- report -----------------------------------------------------------------------------------


@app.command("report")
def report_cmd(
    results_dir: str = typer.Argument(..., help="Output folder of `trustvision audit` (holds results.json)."),
    out: str = typer.Option(None, "--out", "-o", help="HTML file to write (default RESULTS_DIR/report.html)."),
) -> None:
    """Re-render the self-contained HTML report from an audit's results folder."""
    from trustvision.report import render_report

    path = render_report(results_dir, out)
    typer.echo(f"report: {path}")


# --- explain --------------------------------------------------------------------------------


class _ExplainCommand(typer.core.TyperCommand):
    """Fills in the ``--method`` help from the explanation registry when help is shown (the
    methods are imported only then, which keeps ``trustvision --help`` fast)."""

    def format_help(self, ctx, formatter) -> None:
        from trustvision.cli_explain import method_help

        for param in self.params:
            if param.name == "method":
                param.help = method_help()
        super().format_help(ctx, formatter)


@app.command("explain", cls=_ExplainCommand)
def explain_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint path or zoo:NAME."),
    data: str = typer.Option(..., "--data", "-d", help="Dataset name (see `trustvision data`)."),
    method: str = typer.Option("igos++", "--method", help="Explanation method (see trustvision.explain.list_methods)."),
    n: int = typer.Option(16, "--n", help="Number of (seeded, random) images to explain."),
    out: str = typer.Option("explanations", "--out", "--output", "-o", help="Output folder."),
    split: str = typer.Option("test", "--split", help="Dataset split: train, val or test."),
    target: str = typer.Option("predicted", "--target", help="Explain the 'predicted' class or the true 'label'."),
    method_kw: list[str] = typer.Option(None, "--method-kw", metavar="KEY=VALUE", help="A keyword of the method KEY=VALUE (repeatable), e.g. --method-kw n_masks=500 for rise; unknown keywords are refused."),
    iterations: int = typer.Option(None, "--iterations", min=0, max=100_000, help="I-GOS/iGOS++ iterations (default 15); same as --method-kw iterations=N."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", min=1, max=1_000_000, help="Most images per forward/backward pass (the methods' internal_batch_size)."),
    grid: int = typer.Option(None, "--grid", min=1, max=1024, help="SAG patches per side (default 7, fewer for small images); same as --method-kw grid=N."),
    concepts: int = typer.Option(None, "--concepts", min=1, max=64, help="x-features of --method xnn (default 5): an XNN is fitted on the training split and saved in OUT/xnn-model, unless --method-kw xnn=FOLDER names a saved one."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Seed of the image sample and of the method (I-GOS noise, RISE masks)."),
    data_dir: str = typer.Option(None, "--data-dir", help="Root folder of downloadable datasets."),
    image_size: int = typer.Option(None, "--image-size", min=1, max=8192, help="imagefolder:PATH: the side images are resized / cropped to (default: the model's image size)."),
    crop: float = typer.Option(None, "--crop", min=0.01, max=1.0, help="imagefolder:PATH: resize the shorter side to image-size / CROP and centre-crop (e.g. 0.875)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar: one plain line per finished chunk of images (on stderr)."),
) -> None:
    """Explain N test images: PNG overlays + heatmaps.npy + scores.json (deletion/insertion AUCs);
    --method sag writes structured attention graphs (PNG, SVG, JSON); --method xnn fits an XNN
    (--concepts N x-features) and writes each image's x-features, contributions and heatmaps."""
    from trustvision.cli_explain import parse_method_kw, run_explain

    res = run_explain(model, data, method, n, out, split=split, target=target, device=device, seed=seed,
                      iterations=iterations, internal_batch_size=batch_size, grid=grid, data_root=data_dir,
                      method_kw=parse_method_kw(method_kw), progress="lines" if no_progress else True,
                      concepts=concepts, image_size=image_size, crop=crop)
    if "summary" in res:
        s = res["summary"]
        typer.echo(f"{method} on {res['n']} images: deletion AUC {s['deletion_mean']:.4f} +- {s['deletion_std']:.4f} "
                   f"(lower is better), insertion AUC {s['insertion_mean']:.4f} +- {s['insertion_std']:.4f} "
                   f"(higher is better)")
    else:
        typer.echo(f"{method} on {res['n']} images: one {res['kind']} per image ({', '.join(res['formats'])}) in "
                   f"{out}/{res['method']}")
    flagged = sum(r["low_confidence"] or r["wrong_prediction"] for r in res["images"])
    if flagged:
        typer.echo(f"warning: {flagged} images have low confidence or a wrong prediction; their explanations are unreliable")
    typer.echo(f"written to {out} ({res['seconds']:.1f}s)")


def _is(exc: BaseException, *names: str) -> bool:
    """Whether ``exc`` is one of click's exception classes ``names``, from whichever click is in use
    (typer >= 0.23 carries its own copy, so ``except click.ClickException`` misses its errors)."""
    return any(cls.__name__ in names for cls in type(exc).__mro__)


def _usage_error(exc: BaseException) -> int:
    """The usage line and one ``error:`` line on stderr, exit status 2."""
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None) or "trustvision"
    if _is(exc, "NoArgsIsHelpError"):
        names = ", ".join(c.name for c in app.registered_commands if c.name)
        message = f"missing command (one of {names})"
    else:
        try:
            message = exc.format_message()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - any click version
            message = str(exc)
    message = " ".join(str(message).split()).rstrip(".")
    message = message[:1].lower() + message[1:]
    if ctx is not None:
        try:
            usage = " ".join(ctx.get_usage().split())
        except Exception:  # noqa: BLE001
            usage = f"Usage: {path} [OPTIONS]"
        typer.echo(usage, err=True)
    typer.echo(f"error: {message}; see `{path} --help`", err=True)
    return 2


def _tidy_help(cmd) -> None:
    """No ``<bool>`` metavar on flags (nor on --help) in any command's help."""
    for p in getattr(cmd, "params", []):
        if getattr(p, "is_flag", False):
            p.metavar = ""
    original = getattr(cmd, "get_help_option", None)
    if original is not None:
        def get_help_option(ctx, _original=original):
            opt = _original(ctx)
            if opt is not None:
                opt.metavar = ""
            return opt

        cmd.get_help_option = get_help_option
    for sub in (getattr(cmd, "commands", None) or {}).values():
        _tidy_help(sub)


def command():
    """The click command behind ``trustvision`` (help metavars tidied)."""
    cmd = typer.main.get_command(app)
    _tidy_help(cmd)
    return cmd


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status.

    0: done; 1: an audit check failed, or an internal error (one line; set TRUSTVISION_DEBUG=1
    for the traceback); 2: a user mistake (one ``error:`` line, usage errors with the usage line
    before it); 130: interrupted.
    """
    import os

    if os.environ.get("TRUSTVISION_MALLOC_TUNING", "1") != "0":
        tune_cpu_allocator()  # (CPU runs re-use their freed pages; see trustvision._utils.allocator)
    try:
        status = command()(args=sys.argv[1:] if argv is None else list(argv), prog_name="trustvision",
                           standalone_mode=False)
        # click returns typer.Exit(code)'s code instead of raising when standalone_mode=False
        if isinstance(status, int) and not isinstance(status, bool) and status:
            return status
    except TrustVisionError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume (add --resume for `trustvision train`)", err=True)
        return 130
    except SystemExit as exc:  # e.g. --version's typer.Exit under some click versions
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except Exception as exc:  # noqa: BLE001 - click's exceptions (either copy), then anything else
        if _is(exc, "Exit"):
            return int(getattr(exc, "exit_code", 0) or 0)
        if _is(exc, "Abort"):
            typer.echo("aborted", err=True)
            return 130
        if _is(exc, "UsageError", "NoArgsIsHelpError"):
            return _usage_error(exc)
        if _is(exc, "ClickException"):
            message = " ".join(str(getattr(exc, "message", exc)).split())
            typer.echo(f"error: {message}", err=True)
            return 2
        if os.environ.get("TRUSTVISION_DEBUG"):
            raise
        message = " ".join(str(exc).split())
        typer.echo(f"error: internal error ({type(exc).__name__}: {message}); this is a bug in trustvision, "
                   "please report it (TRUSTVISION_DEBUG=1 shows the traceback)", err=True)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
