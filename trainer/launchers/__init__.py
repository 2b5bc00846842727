"""How runs start: the command line and config composition (cli.py), the entry points' one-line
errors (errors.py), and the Ray Train launcher (ray.py), which hands ``run.train`` its train
source and checkpoint callback. The top layer: may import everything below it."""
