"""Spectral tools: Spectrum (SNR-ranked `unfrozen_parameters`) and LASER-RMT (random-matrix low-rank refinement).

`thresholds` and `snr` hold the formulas, `checkpoint` reads weights tensor by tensor, `scan` ranks matrices,
`unfrozen` writes the training fragment, `laser` and `prefix_cache` run the rank-reduction search, `stages` wires
both into the CLI stages, `plots` and `report` present the results.
"""
