"""What d3 measured about a model once, read back at every start:

    layer_profile.py       each layer's measured importance (the importance skip order)
    model_calibration.py   a model's calibration file: its profile, its bridges and the schedule it chose
"""
