"""Workflows: every use case a face offers (the app, the command line, the HTTP API, Batch, Dask),
built on the engine, models, I/O, measurements and the registry; the faces only call these.

Layering (imports point down): cli -> ui -> **workflows** -> service -> models -> registry ->
io / measure -> engine -> resources -> config / errors.

- :mod:`.pipeline` — segment ONE image: read (one axis reader) -> validate -> segment -> measure ->
  provenance -> write; the CLI, Batch, Dask and the app's Segment tab all go through it.
- :mod:`.segment` — the app's form checked against the server's limits, then :mod:`.pipeline` under the GPU wrapper.
- :mod:`.inputs` — uploads and zips checked against the limits (the one validator).
- :mod:`.results` — load a masks file, re-detect puncta, save a correction, add it to a training set.
- :mod:`.batch`, :mod:`.distributed` — many images (threads or Dask).
- :mod:`.finetune` — training sets and the one fine-tune driver (one set of limits).
- :mod:`.model_cache` — the one model cache; :mod:`.lab_models` — lab models (cache invalidation).
- :mod:`.startup` — start-up recovery; :mod:`.display` — pictures of results; :mod:`.hints` — what to try.
- :mod:`cellpose_web.workflows.hitl` — human-in-the-loop: the model learns while a person corrects.
"""
from cellpose_web import __version__  # noqa: F401 - for the faces
from cellpose_web.errors import (BadInputError, CellposeWebError, ModelNotAvailableError,  # noqa: F401
                                 OutOfMemoryError, RunCancelled, TrainingDivergedError)
