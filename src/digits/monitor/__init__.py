"""Watching a registered version in service: its reference (what its answers and inputs look
like on the validation split), drift checks of a window of the prediction log against it
(`digits monitor`), and corrections turned into reviewed training data (`digits feedback`)."""
