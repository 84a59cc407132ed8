"""The few numbers the whole package agrees on."""

IGNORE_INDEX = -100  # labels[i] == IGNORE_INDEX: no loss at position i (Hugging Face convention)
NO_TURN = -1  # turn[i] == NO_TURN: position i belongs to no trained assistant turn
