"""normbench: a benchmark leaderboard and robustness evaluator for normalization layers.

Public extension points live in their modules: ``normbench.norms.register_norm``,
``normbench.optim.register_optimizer``, ``normbench.models.register_model`` and suite files
(``normbench.suites``).
"""

__version__ = "0.1.0"
