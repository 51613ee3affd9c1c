"""Reward components for the synthetic ShapesWorld, scored exactly from each image's scene graph (no judge model):
`components.py` (precision, recall, linguistic, CapRL-QA) and `rating.py` (the 1–10 linguistic rating)."""
