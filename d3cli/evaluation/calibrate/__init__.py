"""`d3 calibrate`: make one model's calibration from its own words.

Four stages, each a pass over text the model itself wrote:

1. corpus    the model's greedy full-depth replies to d3's built-in prompts (profiles/calibration-prompts.json:
             chat questions of many kinds, and plain-text beginnings of prose, instructions, Q/A and code)
2. profile   the NLL cost of skipping each layer alone at late reply positions, on some of those replies: the
             layer profile behind the `importance` skip order
3. bridges   the full-depth hidden states of every reply; for each run of layers that the importance order skips at
             some depth, the ridge least-squares map from the run's input to the change it makes (bridges.py)
4. schedule  the model's replies to prompts held out from the bridges' fit, under candidate (α, min-layers) pairs
             with that order and those bridges, against its full-depth replies: the fastest pair whose replies stay
             within the fidelity budget is the model's schedule (calibrate/schedule_choice.py)

Why the model's own replies: D3 skips layers while the model writes, so those are the hidden states a bridge must
stand in for; and a bridge learns its text's domain (fitted on GSM8K answers it halves the loss there but doubles it
on prose), so the built-in prompts are varied and the corpus is large (too few tokens for a d×d fit overfits: 3.8k
tokens made bridges worse than none on prose, 13k–27k help everywhere). docs/BRIDGES.md has the measurements.

Modules: options (what is asked, checked once) < checkpoint (an unfinished run's work) < stages (the four passes;
schedule_choice holds stage 4's search) < run (the stages in order, the file written); estimate says beforehand how
long it takes and what fits a --time-limit.
"""
