"""Who becomes @champion: the checks and decision, its report, governance, `digits promote`."""
