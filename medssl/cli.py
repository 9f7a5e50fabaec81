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
import os
import importlib
import sys
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["main", "build_parser", "register_command"]

CommandBuilder = Callable[["argparse._SubParsersAction"], None]
_COMMANDS: dict[str, CommandBuilder] = {}
# Modules that register further commands when imported (missing ones are skipped).
_COMMAND_MODULES: tuple[str, ...] = ("medssl.viz.mapping",)  # medssl map


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

    from medssl import paths
    from medssl.data.demo import build_demo_cohort
    from medssl.data.source import DataSource
    from medssl.viz.slices import orthogonal_slices

    progress = not args.quiet
    cohort = build_demo_cohort(n_subjects=args.n_subjects, seed=args.seed, spacing_mm=args.spacing_mm,
                               out_dir=args.cohort_dir, progress=progress)  # fmt: skip
    data = DataSource(manifest=cohort.manifest, preprocess_config=cohort.default_preprocess_config(),
                      label_names=dict(cohort.label_names), cohort=cohort, provenance=cohort.provenance,
                      source="demo", progress=progress)  # fmt: skip
    out = Path(args.out_dir) if args.out_dir is not None else paths.runs_dir() / args.run / "00_data"
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
    p.add_argument("--method", required=True, help="a registered method, e.g. isimed")
    p.add_argument("--preset", default="demo", help="demo | paper | tiny")
    # (--run-name: torchrun's own parser rejects `--run` as an ambiguous prefix of its --run-path)
    p.add_argument("--run", "--run-name", dest="run", default="cli", help="outputs go to runs/<run>/<method>/")
    p.add_argument("--source", default="demo", help='"demo" or a folder of volumes')
    p.add_argument("--n-subjects", type=int, default=48, help="demo cohort size")
    p.add_argument("--target-spacing-mm", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
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

    from medssl import paths
    from medssl.data.source import open_data
    from medssl.evaluate.summary import pretraining_summary
    from medssl.presets import build_run
    from medssl.train import fit

    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        data = open_data(args.source, n_subjects=args.n_subjects, seed=args.seed,
                         target_spacing_mm=args.target_spacing_mm, progress=False)
        model, train_config = build_run(
            args.method, args.preset, seed=args.seed,
            method_overrides={k: yaml.safe_load(v) for k, v in args.method_param},
            train_overrides={k: yaml.safe_load(v) for k, v in args.train_param},
        )
        run_dir = paths.runs_dir() / args.run / args.method
        result = fit(model, data.volumes("train"), train_config, run_dir, val_volumes=data.volumes("val"),
                     resume=not args.no_resume)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(data.provenance)
            summary = pretraining_summary(model, data.volumes("test"), seed=args.seed, run_dir=run_dir)
            summary.to_csv(run_dir / "summary.csv", index=False)
            print(f"\n{args.method}: {result.step} steps, last checkpoint {result.checkpoint_path}")
            print(summary.to_string(index=False))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    for module in _COMMAND_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    parser = argparse.ArgumentParser(prog="medssl", description="Self-supervised learning from the intrinsic "
                                     "spatial information of 3D medical images.")  # fmt: skip
    from medssl import __version__

    parser.add_argument("--version", action="version", version=f"medssl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(sorted(_COMMANDS)) + "}")
    sub.required = True
    for name in sorted(_COMMANDS):
        _COMMANDS[name](sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``medssl <command> ...``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
