"""Everything between storage and the model, in rooms by concern.

- ``maskray.pipeline.segment``: the segmentation job (settings, listing, plan, manifest, the
  actors and their scheduling, the worker that runs a shard, the output's tables and commit).
- ``maskray.pipeline.train``: training with Ray Train and COCO evaluation (settings, data, the
  loop, the driver, schedule, metrics and curves, the synthetic shapes).
- ``maskray.pipeline.results``: reading an output back (SQL queries, pictures).
- Shared by all three: ``storage`` (URLs, credentials kept out of sight, failing fast, reads,
  atomic writes and listings under one retry policy), ``retry`` (which storage failures may
  pass, and that policy), ``decode``, ``limits``, ``weights`` (the one weights reader),
  ``options`` (how settings are given as text), ``cluster`` and ``errors``.
"""
