"""The champion in use: `digits predict`, the drawing page and API (`digits app`)."""
