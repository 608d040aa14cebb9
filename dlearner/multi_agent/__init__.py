"""Multi-agent training: environments, agents-to-modules mapping, and the multi-agent env runner.

See ``docs/concepts.md`` ("Agents and modules") for how agents, modules and the mapping fit together.
"""
