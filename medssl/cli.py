"""The ``medssl`` command: sub-commands that call the same functions the notebooks call.

Adding a command is one builder function registered under its name::

    @register_command("pipeline")
    def _add_pipeline_parser(sub: argparse._SubParsersAction) -> None:
        p = sub.add_parser("pipeline", help="run the ordered notebooks")
        p.add_argument("--plan", default="demo")
        p.set_defaults(func=_run_pipeline)   # func(args) -> exit code

Builders may also live in other modules, as long as the module is imported
before :func:`main` builds the parser (see ``_COMMAND_MODULES``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["main", "build_parser", "register_command"]

CommandBuilder = Callable[["argparse._SubParsersAction"], None]
_COMMANDS: dict[str, CommandBuilder] = {}
# Modules that register further commands when imported (missing ones are skipped).
_COMMAND_MODULES: tuple[str, ...] = ("medssl.viz.mapping", "medssl.export", "medssl.report")  # map, export, report


def register_command(name: str) -> Callable[[CommandBuilder], CommandBuilder]:
    """Register ``builder(subparsers)`` as the parser builder of top-level command ``name``."""

    def deco(builder: CommandBuilder) -> CommandBuilder:
        if name in _COMMANDS and _COMMANDS[name] is not builder:
            raise ValueError(f"medssl command {name!r} is already registered")
        _COMMANDS[name] = builder
        return builder

    return deco


# --------------------------------------------------------------------------- medssl data ...


@register_command("data")
def _add_data_parser(sub: "argparse._SubParsersAction") -> None:
    data = sub.add_parser("data", help="fetch and prepare data")
    data_sub = data.add_subparsers(dest="data_command", metavar="{demo}")
    data_sub.required = True
    demo = data_sub.add_parser(
        "demo",
        help="fetch the TotalSegmentator example volumes, build and cache the synthetic demo cohort",
        description="Fetch the real TotalSegmentator 2.18.0 example volumes (pip download from PyPI), build the "
        "synthetic demo cohort, cache its preprocessed volumes, print the cohort table and write the table and "
        "figures.",
    )
    demo.add_argument("--n-subjects", type=int, default=48, help="synthetic subjects (default 48)")
    demo.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    demo.add_argument("--spacing-mm", type=float, default=3.0, help="voxel size of the subjects (default 3 mm)")
    demo.add_argument("--cohort-dir", type=Path, default=None,
                      help="where the cohort is built (default: $MEDSSL_DATA/demo/cohort-seed<seed>-n<n>)")
    demo.add_argument("--out-dir", type=Path, default=None,
                      help="where the summary CSV and figures go (default: $MEDSSL_RUNS/<run>/00_data)")
    demo.add_argument("--run", default="demo", help="run name for the default --out-dir (default 'demo')")
    demo.add_argument("--show-subjects", type=int, default=3, help="subjects drawn as figures (default 3)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_run_data_demo)


def _run_data_demo(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")  # the CLI never opens windows
    import matplotlib.pyplot as plt

    from medssl.data.demo import build_demo_cohort
    from medssl.data.source import DataSource
    from medssl.rundir import RunDir
    from medssl.viz.slices import orthogonal_slices

    progress = not args.quiet
    cohort = build_demo_cohort(n_subjects=args.n_subjects, seed=args.seed, spacing_mm=args.spacing_mm,
                               out_dir=args.cohort_dir, progress=progress)  # fmt: skip
    data = DataSource(manifest=cohort.manifest, preprocess_config=cohort.default_preprocess_config(),
                      label_names=dict(cohort.label_names), cohort=cohort, provenance=cohort.provenance,
                      source="demo", progress=progress)  # fmt: skip
    out = Path(args.out_dir) if args.out_dir is not None else RunDir(args.run).step_dir("00_data")
    out.mkdir(parents=True, exist_ok=True)
    summary = data.summary()
    summary.to_csv(out / "cohort_summary.csv", index=False)
    print(data.provenance, end="\n\n")
    print(f"cohort: {cohort.root}  (built in {cohort.info.get('build_seconds', float('nan')):.1f} s)")
    print(summary.to_string(index=False))
    figures = []
    for vol in data.volumes("train")[: max(0, args.show_subjects)]:
        figures.append((f"slices_{vol.case_id}.png", orthogonal_slices(vol)))
    train = data.volumes("train")
    if train:
        figures.append((f"lesions_{train[0].case_id}.png", orthogonal_slices(train[0], label="lesion")))
    for vol in data.volumes("external"):
        figures.append((f"slices_{vol.case_id}.png", orthogonal_slices(vol)))
    for name, fig in figures:
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    print(f"\nwrote {out / 'cohort_summary.csv'} and {len(figures)} figure(s) to {out}")
    return 0


# --------------------------------------------------------------------------- medssl pipeline ...


@register_command("pipeline")
def _add_pipeline_parser(sub: "argparse._SubParsersAction") -> None:
    from medssl.pipeline import add_cli_parser  # the pipeline module owns its arguments

    add_cli_parser(sub)


# --------------------------------------------------------------------------- medssl train ...


@register_command("train")
def _add_train_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "train",
        help="pretrain one method headlessly (also under torchrun for DDP)",
        description="Pretrain one registered method on a data source, writing runs/<run>/<method>/ exactly as "
        "10_pretrain.ipynb does. Under `torchrun --nproc-per-node N -m medssl.cli train --run-name R ...` every rank samples "
        "its own volumes and batch-level losses gather across ranks (gloo on CPU, NCCL on GPU).",
    )
    p.add_argument("--method", required=True, help=f"a registered method: {_methods_help()}")
    p.add_argument("--preset", default="demo", help=f"one of {_presets_help()}")
    # (--run-name: torchrun's own parser rejects `--run` as an ambiguous prefix of its --run-path)
    p.add_argument("--run", "--run-name", dest="run", default="cli", help="outputs go to runs/<run>/<method>/")
    p.add_argument("--source", default="demo", help='"demo" or a folder of volumes')
    p.add_argument("--n-subjects", type=int, default=48, help="demo cohort size")
    p.add_argument("--target-spacing-mm", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0, help="initialisation and training seed")
    p.add_argument("--cohort-seed", type=int, default=0, help="demo cohort seed (which synthetic subjects exist)")
    p.add_argument("-m", "--method-param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="method config override (VALUE parsed as YAML), e.g. -m patches_per_volume 8")
    p.add_argument("-t", "--train-param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="TrainConfig override, e.g. -t epochs 5")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run")
    p.set_defaults(func=_train_main)


def _train_main(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist
    import yaml

    from medssl.data.source import open_data
    from medssl.evaluate.summary import pretraining_summary
    from medssl.presets import build_run
    from medssl.rundir import RunDir
    from medssl.train import fit
    from medssl.train.precision import resolve_device

    # Everything a run needs is checked before any data is built or any step is trained.
    rd = RunDir(args.run)  # refuses names that would leave the runs folder
    method_overrides = {k: yaml.safe_load(v) for k, v in args.method_param}
    train_overrides = {k: yaml.safe_load(v) for k, v in args.train_param}
    model, train_config = build_run(args.method, args.preset, seed=args.seed, method_overrides=method_overrides,
                                    train_overrides=train_overrides)  # unknown names and wrong types raise here
    _check_device(train_config.device)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        device = resolve_device(train_config.device)  # NCCL for CUDA training only (-t device cpu: gloo)
        if device.type == "cuda":  # each rank on its own GPU before NCCL starts (else every rank uses cuda:0)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        data = open_data(args.source, n_subjects=args.n_subjects, cohort_seed=args.cohort_seed,
                         target_spacing_mm=args.target_spacing_mm, progress=False, patch_size_vox=model.input_size_vox)
        train, val = data.volumes("train"), (data.volumes("val") if "val" in data.splits else [])
        if not train:
            raise ValueError(f"{args.source}: no training volumes (splits found: {data.splits})")
        run_dir = rd.method_dir(args.method)
        result = fit(model, train, train_config, run_dir, val_volumes=val or None, resume=not args.no_resume)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(data.provenance)
            print(f"\n{args.method}: {result.step} steps, last checkpoint {result.checkpoint_path}")
            if val:
                summary = pretraining_summary(model, val, seed=args.seed, run_dir=run_dir).assign(split="val")
                summary.to_csv(rd.files(args.method).summary, index=False)
                print(summary.to_string(index=False))
            else:
                print("no validation split: the validation summary was skipped")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _check_device(device: str) -> None:
    """``-t device ...`` must name a device this machine has, before any data is built (torch's own message
    comes only when the model moves there: "Torch not compiled with CUDA enabled")."""
    import torch

    if str(device) == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"-t device {device}: not a device name; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else \
                "no CUDA GPU is visible on this machine"
            raise ValueError(f"-t device {device}: {why}; use -t device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"-t device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")  # fmt: skip
    elif dev.type not in ("cpu", "mps") or (dev.type == "mps" and not torch.backends.mps.is_available()):
        raise ValueError(f"-t device {device}: not available here; use auto, cpu or cuda")


# --------------------------------------------------------------------------- medssl sweep ...


@register_command("sweep")
def _add_sweep_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "sweep",
        help="train one run per value of a setting and compare them on the validation split",
        description="Choose a setting on the validation split only: one pretraining run per value (resumable), "
        "each summarised on the validation subjects (distance fidelity, effective rank). The test split is not "
        "loaded. Writes runs/<run>/sweeps/<method>-<param>.csv.",
    )
    p.add_argument("--method", required=True, help=f"a registered method: {_methods_help()}")
    p.add_argument("--param", required=True, help="a method config or TrainConfig field, e.g. scale_mm")
    p.add_argument("--values", nargs="+", required=True, help="values (parsed as YAML)")
    p.add_argument("--preset", default="demo", help=f"one of {_presets_help()}")
    p.add_argument("--run", default="sweep")
    p.add_argument("--metric", default="spearman", help="validation column to choose by (higher is better)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_sweep_main)


def _sweep_main(args: argparse.Namespace) -> int:
    import yaml

    from medssl.select import choose, sweep

    values = [yaml.safe_load(v) for v in args.values]
    table = sweep(args.method, args.param, values, preset=args.preset, run=args.run, seed=args.seed)
    cols = [c for c in ("value", "split", "spearman", "abs_err_median_mm", "effective_rank", "steps") if c in table]
    print(table[cols].to_string(index=False))
    print(f"\nbest {args.param} on the validation split by {args.metric}: {choose(table, args.metric)}")
    return 0


# --------------------------------------------------------------------------- entry point


def _methods_help() -> str:
    from medssl.methods import list_methods

    return ", ".join(list_methods())


def _presets_help() -> str:
    from medssl.presets import list_presets

    return ", ".join(list_presets())


def build_parser() -> argparse.ArgumentParser:
    for module in _COMMAND_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    parser = argparse.ArgumentParser(
        prog="medssl",
        description="Self-supervised learning from the intrinsic spatial information of 3D medical images.",
        epilog=f"methods: {_methods_help()}. presets: {_presets_help()}. "
        "Errors print a message and exit 1; add --debug for the traceback.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    from medssl import __version__

    parser.add_argument("--version", action="version", version=f"medssl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(sorted(_COMMANDS)) + "}")
    sub.required = True
    for name in sorted(_COMMANDS):
        _COMMANDS[name](sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``medssl <command> ...``; returns the exit code."""
    from medssl._alloc import tune_malloc

    tune_malloc()  # an entry point: the allocator settings that make CPU training ~2x faster here
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("medssl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the command line shows the message, not a traceback
        if args.debug:
            raise
        print(f"medssl {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
