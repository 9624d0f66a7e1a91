"""The artifact's runtime: an artifact's prompt program and inference settings applied to a loaded model.

One layer that `evaluate`, `hone serve`, `hone export` and `compare` all call, so a served artifact answers
exactly as it was scored (docs/architecture.md):

- apply.py        `ArtifactRuntime`: the artifact, its task, the model and the generator it answers with
- selectors.py    per-query demonstration selection from the artifact's pool (bm25.py, embeddings.py)
- calibration.py  per-choice offsets on label log-likelihoods
- best_of_n.py    best-of-n at inference (the manifest's `inference` block), scored by rewards.py
- tasks.py        loading a task with its metric and reward names checked

The program and the inference settings themselves are plain data at the bottom (honellm/program.py).
"""
