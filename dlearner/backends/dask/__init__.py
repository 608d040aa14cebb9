"""Learners and env runners as Dask actors, one concept per file:

* ``cluster``     connecting (client, address, scheduler file, embedded LocalCluster) and placement;
* ``protocol``    the request and the typed replies between the driver and a learner;
* ``rpc``         calling an actor's method over the cluster's own comms;
* ``actor``       the learner side: :class:`LearnerActor` and its ordered executor;
* ``actor_group`` what every group of actors shares: members, deaths, typed calls, replacements;
* ``pool``        the driver side of the learners: :class:`DaskLearnerPool` (numbering, dispatch, re-forming);
* ``async_updates`` the task behind ``update_async`` futures, and their retries after a lost learner;
* ``env_runners`` the env-runner actors: :class:`DaskEnvRunnerGroup`.

The GPU decisions they apply (device per rank, GPU packing, NCCL or gloo) are :mod:`dlearner.devices`.
"""
