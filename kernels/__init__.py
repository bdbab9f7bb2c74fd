"""Products of the structured linear family.

One module per product (``lowrank``, ``blockdiag``, ``monarch``, ``blast``, ``nm``). Each exposes a torch
reference implementation, which is what runs on CPU and what every faster path is tested against.
Layers in ``model/structured`` call only these functions, so a faster implementation slots in here
without touching the model.
"""
