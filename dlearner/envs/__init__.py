"""Small environments that ship with dlearner, for examples, tests and benchmarks."""

from dlearner.envs.find_the_square import FindTheSquare
from dlearner.envs.multi_agent_cartpole import MultiAgentCartPole

__all__ = ["FindTheSquare", "MultiAgentCartPole"]
