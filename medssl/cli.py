"""The ``medssl`` command: sub-commands that call the same functions the notebooks call.

``cli`` is the top of the package: it imports the modules that implement the commands, never the other
way round. A command is a parser builder, here (``@register_command``) or in the module that implements
it (``add_cli_parser(subparsers)``, listed in ``_COMMAND_MODULES``)::

    @register_command("pipeline")
    def _add_pipeline_parser(sub: argparse._SubParsersAction) -> None:
        p = sub.add_parser("pipeline", help="run the ordered notebooks")
        p.add_argument("--plan", default="demo")
        p.set_defaults(func=_run_pipeline)   # func(args) -> exit code

A module in ``_COMMAND_MODULES`` that fails to import is an error of ``medssl`` itself (its command would
vanish from ``--help`` otherwise). Those modules import only what their parsers need at the top, so that
``medssl --help`` stays fast (no scikit-learn, SciPy, MONAI or training loop).
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
# Commands whose parser the implementing module builds: name -> module with `add_cli_parser(subparsers)`.
_COMMAND_MODULES: dict[str, str] = {"map": "medssl.viz.mapping", "export": "medssl.export", "report": "medssl.report"}


def register_command(name: str) -> Callable[[CommandBuilder], CommandBuilder]:
    """Register ``builder(subparsers)`` as the parser builder of top-level command ``name``."""

    def deco(builder: CommandBuilder) -> CommandBuilder:
        if name in _COMMANDS and _COMMANDS[name] is not builder:
            raise ValueError(f"medssl command {name!r} is already registered")
        if name in _COMMAND_MODULES:
            raise ValueError(f"medssl command {name!r} is already registered (by {_COMMAND_MODULES[name]})")
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
    if args.out_dir is None and args.cohort_dir is None:  # the run's data, for its notebooks (as 00_data records it)
        from medssl.data.spec import DataSpec

        spec = DataSpec(source="demo", n_subjects=args.n_subjects, cohort_seed=args.seed, target_spacing_mm=args.spacing_mm)
        print(f"data spec of run {args.run}: {RunDir(args.run).write_data_spec(spec)}")
    print(f"\nwrote {out / 'cohort_summary.csv'} and {len(figures)} figure(s) to {out}")
    return 0


# --------------------------------------------------------------------------- medssl pipeline ...


@register_command("pipeline")
def _add_pipeline_parser(sub: "argparse._SubParsersAction") -> None:
    from medssl.pipeline import add_cli_parser  # the pipeline module owns its arguments

    add_cli_parser(sub).set_defaults(func=pipeline_main)


def pipeline_main(args: argparse.Namespace) -> int:
    """``medssl pipeline``: a notebook plan (:mod:`medssl.pipeline`), or the reference study's resumable units
    (``--plan study``, :mod:`medssl.study`, which itself runs its evaluation notebooks through the pipeline)."""
    from medssl import pipeline, study

    if study.is_study_plan(args.plan):
        args.run = args.run or "study"
        return study.cli_main(args)
    return pipeline.cli_main(args)


# --------------------------------------------------------------------------- medssl train ...


@register_command("train")
def _add_train_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "train",
        help="pretrain one method headlessly (also under torchrun for DDP)",
        description="Pretrain one registered method on a data source, writing runs/<run>/<method>/ exactly as "
        "10_pretrain.ipynb does (both call medssl.pretraining.pretrain). Under "
        "`torchrun --nproc-per-node N -m medssl.cli train --run-name R ...` every rank samples its own "
        "volumes and batch-level losses gather across ranks (gloo on CPU, NCCL on GPU).",
    )
    p.add_argument("--method", required=True, help=f"a registered method: {_methods_help()}")
    p.add_argument("--preset", default="demo", help=f"one of {_presets_help()}")
    # (--run-name: torchrun's own parser rejects `--run` as an ambiguous prefix of its --run-path)
    p.add_argument("--run", "--run-name", dest="run", default="cli", help="outputs go to runs/<run>/<method>/")
    _add_data_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="initialisation and training seed")
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

    from medssl.pretraining import Pretraining
    from medssl.train.precision import check_device, resolve_device

    method_overrides = {k: yaml.safe_load(v) for k, v in args.method_param}
    train_overrides = {k: yaml.safe_load(v) for k, v in args.train_param}
    check_device(str(train_overrides.get("device", "auto")), "-t device")  # before any data is built
    # Everything is checked (run name, overrides, device) before any data is opened; the data (every case against
    # the method's input size) before any step is trained.
    job = Pretraining(args.run, args.method, args.preset, _data_settings(args), method_overrides=method_overrides,
                      train_overrides=train_overrides, seed=args.seed, progress=False)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        device = resolve_device(job.train_config.device)  # NCCL for CUDA training only (-t device cpu: gloo)
        if device.type == "cuda":  # each rank on its own GPU before NCCL starts (else every rank uses cuda:0)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        result = job.run(resume=not args.no_resume)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(job.data.provenance)
            print(f"\n{args.method}: {result.steps} steps, last checkpoint {result.fit.checkpoint_path}")
            if result.summary is not None:
                print(result.summary.to_string(index=False))
            else:
                print("no validation split: the validation summary was skipped")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data", "Default: the run's data (runs/<run>/00_data/data_spec.json, written by 00_data "
                             "or by the first medssl train of the run), else the demo cohort (48 subjects, 3 mm). A flag "
                             "overrides that one setting.")
    g.add_argument("--source", default=None, help='"demo" or a folder of volumes')
    g.add_argument("--n-subjects", type=int, default=None, help="demo cohort size (default 48)")
    g.add_argument("--target-spacing-mm", type=float, default=None, help="isotropic voxel size (default 3 mm)")
    g.add_argument("--cohort-seed", type=int, default=None, help="demo cohort seed (which synthetic subjects exist)")


def _data_settings(args: argparse.Namespace) -> dict:
    """The data flags given on the command line (overrides of the run's data spec)."""
    given = {"source": args.source, "n_subjects": args.n_subjects, "cohort_seed": args.cohort_seed,
             "target_spacing_mm": args.target_spacing_mm}
    return {k: v for k, v in given.items() if v is not None}


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
    _add_data_arguments(p)
    p.set_defaults(func=_sweep_main)


def _sweep_main(args: argparse.Namespace) -> int:
    import yaml

    from medssl.select import choose, sweep

    values = [yaml.safe_load(v) for v in args.values]
    table = sweep(args.method, args.param, values, preset=args.preset, run=args.run, seed=args.seed,
                  data=_data_settings(args))
    cols = [c for c in ("value", "split", "spearman", "abs_err_median_mm", "effective_rank", "steps") if c in table]
    print(table[cols].to_string(index=False))
    print(f"\nbest {args.param} on the validation split by {args.metric}: {choose(table, args.metric)}")
    return 0


# --------------------------------------------------------------------------- entry point


def _methods_help() -> str:
    from medssl._method_index import method_names  # torch only when the methods package changed

    return ", ".join(method_names())


def _presets_help() -> str:
    from medssl.presets import list_presets

    return ", ".join(list_presets())


def build_parser() -> argparse.ArgumentParser:
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
    builders = {**{name: _module_builder(module) for name, module in _COMMAND_MODULES.items()}, **_COMMANDS}
    for name in sorted(builders):
        builders[name](sub)
    return parser


def _module_builder(module: str) -> CommandBuilder:
    return lambda sub: importlib.import_module(module).add_cli_parser(sub)


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
