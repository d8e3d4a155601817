"""D3 inside lm-evaluation-harness: the model `d3` (model.py), run by lm-eval's own CLI (`python -m
d3cli.evaluation.harness`) or by `d3 bench --task lm-eval:TASK` (bench.py).

lm-eval finds models in a registry filled by imports, with no plugin discovery: the name `d3` exists once
`d3cli.evaluation.harness.model` is imported. Importing this package does not import lm_eval; `model` does.
"""
