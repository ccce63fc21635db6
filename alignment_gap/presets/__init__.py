"""Config building blocks: model sizes and pretrained architectures, meshes, the sections every
trainer shares, and each trainer's base config. The files in the repository's `configs/`
compose them (and the study composes the trainers' configs), so the library never imports
`configs/`.
"""
