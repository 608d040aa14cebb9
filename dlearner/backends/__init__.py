"""Where learners and env runners run: ``local`` (this process) or ``dask`` (actors on a cluster).

Both implement the interfaces of :mod:`dlearner.backends.interface`.
"""
