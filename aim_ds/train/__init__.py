"""AIM pretraining with DeepSpeed, one concern a module (a room stands above what it imports):

- :mod:`.config`: the run config's sections, :class:`~.config.RunPlan` (steps, batch split) and
  the errors the driver maps to exit codes; no process group, no DeepSpeed;
- :mod:`.engine`: the DeepSpeed config merge, the model and the engine;
- :mod:`.preflight`: every field and path checked before any rank builds anything (exit 2);
- :mod:`.lock`: one job per run folder (``run.lock``) and the watch on the launcher;
- :mod:`.data`: the loaders, stateless prefix draws and the data position;
- :mod:`.job`: what one rank's loop shares (:class:`~.job.Job`) and the checkpoint save;
- :mod:`.stopping`: SIGTERM / SIGINT, a launcher gone, ``train.stop_after_steps``: checkpoint, then stop;
- :mod:`.evaluate`: the held-out loss; :mod:`.finish`: the end-of-run plots, reference forward, export;
- :mod:`.loop`: :func:`~.loop.run`, the step loop.

Conventions. ``step`` counts completed optimizer steps (the first update is step 0's, after which
``step == 1``); checkpoints, logs and ``train.steps`` use that count. One optimizer step consumes
``grad_accum_steps`` micro-batches of ``micro_batch_size`` images on each of ``world_size`` ranks.
The data position is ``(epoch, batch_in_epoch)``, the next micro-batch this rank will read.
Prefix lengths are drawn from a generator seeded by ``(seed, rank, step, micro-step)``, so they are
independent across ranks and a resumed run draws exactly what a straight run would have.
"""
