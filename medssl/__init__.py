"""medssl: self-supervised learning from the intrinsic spatial information of 3D medical images.

The everyday API, loaded lazily so ``import medssl`` stays cheap (no torch until used)::

    import medssl
    data = medssl.open_data("demo")                     # or a folder of scans
    model, config = medssl.build_run("isimed", "demo")  # a seeded method + its TrainConfig
    medssl.fit(model, data.volumes("train"), config, medssl.RunDir("mine").method_dir("isimed"))
    medssl.pretrain("mine", "isimed", "demo")           # the same in one call, with figures and a summary
    model = medssl.load_method(medssl.RunDir("mine").checkpoint("isimed"))
    medssl.list_methods()

``import medssl`` changes nothing in the process. The glibc allocator tuning that speeds up CPU
training (README, "Performance") is one explicit call, :func:`tune_malloc`, made by the entry
points (the ``medssl`` command, pipeline kernels, ``make``) and by the training notebooks.
"""

from __future__ import annotations

from medssl._lazy import lazy_attributes

__version__ = "0.1.0"

_LAZY = {
    "open_data": "medssl.data.source",
    "build_run": "medssl.presets",
    "preset": "medssl.presets",
    "fit": "medssl.train",
    "load_method": "medssl.train",
    "TrainConfig": "medssl.train",
    "list_methods": "medssl.methods",
    "create_method": "medssl.methods",
    "method_info": "medssl.methods",
    "RunDir": "medssl.rundir",
    "pretrain": "medssl.pretraining",
    "run_pipeline": "medssl.pipeline",
    "tune_malloc": "medssl._alloc",
}

__all__ = ["__version__", *_LAZY]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
