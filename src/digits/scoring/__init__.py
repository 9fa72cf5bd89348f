"""A version's scores: the corruption suite, the figures, the score cache in the registry."""
