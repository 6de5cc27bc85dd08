"""Theory toys (docs/science.md, "Theory toys"): overparameterised linear regression (``lls``) and diagonal
linear networks (``dln``) under GD, SGD, Noisy-SGD and the SDE, vectorised over seeds, in float64.
"""

from goldenpath.toys.problems import Problem, make_problem, optimise  # noqa: F401
