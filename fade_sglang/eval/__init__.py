"""Evaluation and tools: the demo, quality and serving harnesses, workloads, the server launcher, synthetic
data and the tiny test model. Built on the core and on real SGLang processes; nothing in the core or in
``patches/`` imports from here."""
