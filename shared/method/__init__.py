"""The DUME method and the model I/O it needs; ``merge.py`` tells the whole story top to bottom.

families (what a model family is called), expert (a dense expert on disk), data (documents packed into rows),
averaging (the basis), statistics (router statistics and their layout), ridge (the closed-form router),
routers (settings to routers and the checkpoint's ``dume`` block), writer (the MoE checkpoint), routing (the merged
model in memory, with its baselines), registration (router-bias classes), training and evaluation.
"""
