"""The paper's hypotheses by name (PAPER.md, "Hypotheses tested"): each a study variant of
`configs/study.py` and a module of `alignment_gap.study.hypotheses` with that `NAME`. Here, with
nothing heavy imported, so a config file can read them."""

HYPOTHESES = ("coverage", "quality", "classification", "noncontrastive", "scaling")
