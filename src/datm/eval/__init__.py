"""Evaluation: translating through the run's modules (`translate`), scoring hypotheses against
references (`evaluate`, `comet`), and paired significance (`significance`). It knows nothing about
strategies."""
