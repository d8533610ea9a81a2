"""Constants shared by data, training and export."""

#: Label of positions that carry no target (padding, prompts): ``F.cross_entropy(..., ignore_index=IGNORE_INDEX)``.
IGNORE_INDEX = -100
