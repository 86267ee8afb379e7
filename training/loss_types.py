"""The loss types of ``training.losses`` by name, without torch: the configs offer them and the web process imports
the configs.

A loss is written in losses.py and named here; the configs' choices and checks, both command lines and the tests
that go over every loss read these names.
"""

# Each DPO loss_type, with what label_smoothing makes of it ("" where the loss does not read it).
DPO_LOSSES: dict[str, str] = {"sigmoid": "cDPO", "ipo": "", "hinge": "", "robust": "rDPO"}
DPO_LOSS_TYPES = tuple(DPO_LOSSES)
DPO_SMOOTHED_LOSS_TYPES = tuple(name for name, smoothed in DPO_LOSSES.items() if smoothed)

GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
