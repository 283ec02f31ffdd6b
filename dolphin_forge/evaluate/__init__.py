"""Evaluation: perplexity and validation loss (`perplexity`), lm-evaluation-harness tasks run offline from local
files (`harness`, `tasks/`), NLTK's sentence model for IFEval offline (`punkt`), result tables (`report`) and the
`eval` stage that ties them together (`run`)."""
