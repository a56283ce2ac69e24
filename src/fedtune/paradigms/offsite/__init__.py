"""Offsite-tuning: clients tune adapter blocks around an emulator of the model's middle, never the full model.

``emulator.py`` builds the emulator (uniform layer drop) and maps a tuned adapter back onto the full
model. The package is not a registered paradigm yet: it has no server or client half.
"""
