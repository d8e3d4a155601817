"""Evaluation: benchmark tasks and data, bench runs, teacher-forced scoring, perplexity and layer profiles, calibration
(d3 calibrate, the α/floor recommendation), timing and the speed benchmark. Imports the core, never the cli."""
