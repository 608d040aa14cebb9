"""Learners and env runners as Dask actors, one concept per file:

* ``cluster``     connecting (client, address, scheduler file, embedded LocalCluster) and placement;
* ``devices``     the GPU decisions (device per rank, GPU packing, NCCL or gloo, pinned copies), testable without a GPU;
* ``protocol``    the request and the typed replies between the driver and a learner;
* ``rpc``         calling an actor's method over the cluster's own comms;
* ``actor``       the learner side: :class:`LearnerActor` and its ordered executor;
* ``pool``        the driver side: :class:`DaskLearnerPool` (numbering, dispatch, deaths, re-forming);
* ``env_runners`` env-runner actors.
"""
