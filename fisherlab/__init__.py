"""fisherlab: how well do Kronecker-factored approximations represent the Fisher matrix?"""

__version__ = "0.1.0"
